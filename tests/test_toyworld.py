import numpy as np
import pytest
import torch

from erasure.core.tokenizer import build_clip_tokenizer
from erasure.diffusion.models import fingerprint
from erasure.loading import load_components
from erasure.worlds.toyworld.train import train_toyworld
from erasure.worlds.toyworld.world import SHAPES, Scene, caption, render, sample_batch, vocabulary


def test_world_renders_deterministically_per_seed():
    a_images, a_captions, _ = sample_batch(np.random.default_rng(5), 6)
    b_images, b_captions, _ = sample_batch(np.random.default_rng(5), 6)
    c_images, _, _ = sample_batch(np.random.default_rng(6), 6)
    assert np.array_equal(a_images, b_images) and a_captions == b_captions
    assert not np.array_equal(a_images, c_images)


def test_shapes_colours_and_styles_differ():
    renders = {s: render(Scene(s, "red", "solid", 0.5, 0.5, 0.38)) for s in SHAPES}
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1:]:
            assert np.abs(renders[a].astype(int) - renders[b].astype(int)).sum() > 0, (a, b)
    solid, striped, outlined = (render(Scene("square", "blue", st, 0.5, 0.5, 0.38)) for st in ("solid", "striped", "outlined"))
    painted = lambda image: (image.astype(int).sum(-1) > 200).mean()  # noqa: E731
    assert painted(solid) > painted(striped) > painted(outlined) > 0
    assert tuple(render(Scene("circle", "red", "solid", 0.5, 0.5, 0.4))[8, 8]) == (220, 30, 30)


def test_captions_use_synonyms_and_every_word_is_one_token():
    rng = np.random.default_rng(0)
    scene = Scene("circle", "red", "striped", 0.5, 0.5, 0.35)
    texts = {caption(scene, rng) for _ in range(300)}
    assert any("ball" in t or "disc" in t for t in texts) and any("crimson" in t or "scarlet" in t for t in texts)
    tokenizer = build_clip_tokenizer(vocabulary(), model_max_length=16)
    for word in vocabulary():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, word
        assert tokenizer.decode(ids).strip() == word  # round trip
    text = "a striped crimson ball"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.slow
@pytest.mark.parametrize("world", ["minilm", "clip"])
def test_trainer_lowers_the_loss_and_resumes(tmp_path, world):
    torch.manual_seed(0)
    folder, losses = train_toyworld(
        tmp_path, steps=40, batch=8, lr=2e-3, warmup=1, checkpoint_every=20, world=world, log=lambda _: None
    )
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    model = load_components(str(folder))
    assert model.vae is None and model.unet.config.sample_size == 16
    from erasure.worlds.toyworld.settings import SAMPLING

    assert model.defaults == SAMPLING.model_dump()  # a retrained model keeps its sampling settings
    # a finished run resumes from its checkpoint and has nothing left to do
    _, more = train_toyworld(tmp_path, steps=40, batch=8, lr=2e-3, warmup=1, world=world, log=lambda _: None)
    assert more == []
    assert fingerprint(load_components(str(folder))) == fingerprint(model)


@pytest.mark.parametrize("world", ["minilm", "clip"])
def test_committed_models_and_classifier_load_offline(world):
    from erasure.worlds.toyworld.model import CLASSIFIER_FILE, MODEL_DIRS, load_toyworld_classifier
    from erasure.worlds.toyworld.settings import SAMPLING

    model = load_components({"minilm": "builtin:toyworld", "clip": "builtin:toyworld-clip"}[world])
    assert model.vae is None and model.defaults == SAMPLING.model_dump()  # one home: settings.SAMPLING
    assert load_components(str(MODEL_DIRS[world])).unet.config == model.unet.config
    assert type(model.text_encoder).__name__ == {"minilm": "BertModel", "clip": "CLIPTextModel"}[world]
    assert model.unet.config.cross_attention_dim == {"minilm": 384, "clip": 64}[world]
    committed = sum(f.stat().st_size for f in MODEL_DIRS[world].rglob("*") if f.is_file())
    assert committed < 25_000_000  # the frozen encoder is installed, not committed
    from erasure.worlds.toyworld.classifier import held_out_accuracy

    assert CLASSIFIER_FILE.stat().st_size < 2_000_000
    # the committed classifier, as loaded, still reads clean renders (TRAINING.md: 100 %)
    accuracy = held_out_accuracy(load_toyworld_classifier(), count=200)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_the_frozen_encoder_keeps_synonyms_apart():
    """The reason for the MiniLM world: its synonyms are separate directions, while the CLIP
    world's encoder, trained with the UNet, collapses them onto their word."""
    from erasure.core.capacity import concept_states
    from erasure.worlds.toyworld.world import WORLD_TEMPLATES

    cosines = {}
    for model in ("builtin:toyworld", "builtin:toyworld-clip"):
        components = load_components(model)
        red, crimson = concept_states(components, ["red"], WORLD_TEMPLATES), concept_states(components, ["crimson"], WORLD_TEMPLATES)
        n = min(len(red), len(crimson))
        cosines[model] = float(torch.nn.functional.cosine_similarity(red[:n], crimson[:n], dim=1).mean())
    assert cosines["builtin:toyworld"] < 0.9 < cosines["builtin:toyworld-clip"], cosines


def test_unseen_probes_say_a_concept_only_with_held_out_words_never_in_training():
    from erasure.worlds.toyworld.judge import erasure_probes
    from erasure.worlds.toyworld.world import CAPTION_TEMPLATES, HELD_OUT

    with_unseen = erasure_probes(["red", "circle"], ["blue"], unseen={"red": ("rose",), "circle": ("ring",)})
    without = erasure_probes(["red", "circle"], ["blue"])
    unseen = [p for p in with_unseen if p.group == "unseen"]
    assert unseen and all(("rose" in p.prompt) != ("ring" in p.prompt) for p in unseen)
    assert all("red" not in p.prompt.split() for p in unseen if "rose" in p.prompt)
    assert with_unseen[: len(without)] == without  # appended: no other probe's prompt or seed moves
    training_words = set(vocabulary()) | {w for t in CAPTION_TEMPLATES for w in t.replace("{}", " ").split()}
    assert not training_words & {w for words in HELD_OUT.values() for w in words}
