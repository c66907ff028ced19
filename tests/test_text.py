import pytest
import torch

from erasure.core.text import align_tokens, tokenize


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



@pytest.fixture(scope="module", params=["bert", "t5"])
def bidirectional(request):
    from erasure.diffusion.models import build_tiny_components

    return build_tiny_components(text_encoder=request.param).eval()


def test_word_piece_concepts_align_in_bert_and_t5_layouts(bidirectional):
    """BERT: [CLS] ... [SEP] [PAD]; T5: no start token, ... </s> <pad>. "kitty" is two pieces."""
    tok = bidirectional.tokenizer
    c, cl = ids_of(tok, "a photo of the kitty on the ground")
    a, al = ids_of(tok, "a photo of the dog on the ground")
    start = 1 if tok.cls_token_id is not None else 0  # [CLS] or nothing
    assert [tok.convert_ids_to_tokens(i) for i in c[start + 4 : start + 6]] == ["kit", "##ty"]
    alignment = align_tokens(c, cl, a, al)
    assert alignment.concept_span == (start + 4, start + 5)
    pairs = dict(alignment.pairs)
    assert all(pairs[i] == i for i in range(start + 4))  # prefix (and [CLS])
    for k in range(4):  # "on the ground" + [SEP] / </s>, one position earlier in the anchor prompt
        assert pairs[start + 6 + k] == start + 5 + k and c[start + 6 + k] == a[start + 5 + k]
    assert c[cl - 1] == (tok.sep_token_id if start else tok.eos_token_id)


def test_bidirectional_states_ignore_padding_and_prefix_states_see_the_concept(bidirectional):
    """With the attention mask a prompt's states do not depend on how much padding follows; and unlike
    CLIP, the prefix's states differ between concept and anchor prompts (real CFR targets, not identity)."""
    from erasure.core.text import encode

    tok, encoder = bidirectional.tokenizer, bidirectional.text_encoder
    ids, lengths = tokenize(tok, ["a photo of the cat", "a photo of the dog"])
    states = encode(encoder, ids)
    shorter = tok(["a photo of the cat"], padding="max_length", max_length=12, return_tensors="pt")["input_ids"]
    n = int(lengths[0])
    assert torch.allclose(encode(encoder, shorter)[0, :n], states[0, :n], atol=1e-5)
    assert not torch.allclose(states[0, 1], states[1, 1], atol=1e-4)  # a prefix token saw "cat" vs "dog"


def test_clip_prefix_states_are_identical_as_before(tiny):
    from erasure.core.text import encode

    ids, _ = tokenize(tiny.tokenizer, ["a photo of the cat", "a photo of the dog"])
    states = encode(tiny.text_encoder, ids)
    assert torch.equal(states[0, :5], states[1, :5])  # causal: the prefix never sees the concept
