from erasure.text import align_tokens, tokenize


def ids_of(tokenizer, prompt):
    ids, lengths = tokenize(tokenizer, [prompt])
    return ids[0].tolist(), int(lengths[0])


def test_alignment_single_token_concept_at_end(tiny):
    c, cl = ids_of(tiny.tokenizer, "a photo of the cat")
    a, al = ids_of(tiny.tokenizer, "a photo of the dog")
    alignment = align_tokens(c, cl, a, al)
    assert alignment.concept_span == (5,)  # BOS a photo of the | cat
    pairs = dict(alignment.pairs)
    assert all(pairs[i] == i for i in range(5))  # prefix: identity rows
    assert pairs[6] == 6  # EOS
    assert pairs[len(c) - 1] == len(c) - 1  # last padding aligned from the end
    assert 5 not in pairs  # the concept itself is left to the LoRA


def test_alignment_multi_token_concept_mid_prompt(tiny):
    # "van gogh" is two tokens, "art" one; the suffix shifts by one position
    c, cl = ids_of(tiny.tokenizer, "a painting of van gogh on the ground")
    a, al = ids_of(tiny.tokenizer, "a painting of art on the ground")
    assert cl == al + 1
    alignment = align_tokens(c, cl, a, al)
    assert alignment.concept_span == (4, 5)
    pairs = dict(alignment.pairs)
    # "on the ground" + EOS in the concept prompt map one position earlier in the anchor prompt
    for k in range(4):
        assert pairs[6 + k] == 5 + k
        assert c[6 + k] == a[5 + k]
    # paddings: concept has one fewer, all aligned counted from the end
    pads = [(i, j) for i, j in alignment.pairs if i >= cl]
    assert pads == [(i, i) for i in range(cl, len(c))]


def test_alignment_anchor_longer_than_concept(tiny):
    c, cl = ids_of(tiny.tokenizer, "a photo of the nude")
    a, al = ids_of(tiny.tokenizer, "a photo of the person wearing clothes")
    alignment = align_tokens(c, cl, a, al)
    assert alignment.concept_span == (5,)
    pairs = dict(alignment.pairs)
    assert pairs[6] == al - 1  # EOS to EOS
    assert all(i >= cl or i < 5 or i == 6 for i in pairs)


def test_tokenizer_words_are_single_tokens_and_unknown_words_still_tokenise(tiny):
    tok = tiny.tokenizer
    assert len(tok("cat", add_special_tokens=False)["input_ids"]) == 1
    ids = tok("zyx", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    assert tok.decode(ids).replace(" ", "") == "zyx"
