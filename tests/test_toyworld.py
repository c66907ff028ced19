import numpy as np
import torch

from erasure.models import fingerprint, load_components
from erasure.tokenizer import build_clip_tokenizer
from erasure.toyworld.train import train_toyworld
from erasure.toyworld.world import SHAPES, Scene, caption, render, sample_batch, vocabulary


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


def test_trainer_lowers_the_loss_and_resumes(tmp_path):
    torch.manual_seed(0)
    folder, losses = train_toyworld(tmp_path, steps=40, batch=8, lr=2e-3, warmup=1, checkpoint_every=20, log=lambda _: None)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    model = load_components(str(folder))
    assert model.vae is None and model.unet.config.sample_size == 16
    from erasure.toyworld.settings import SAMPLING

    assert model.defaults == SAMPLING.model_dump()  # a retrained model keeps its sampling settings
    # a finished run resumes from its checkpoint and has nothing left to do
    _, more = train_toyworld(tmp_path, steps=40, batch=8, lr=2e-3, warmup=1, log=lambda _: None)
    assert more == []
    assert fingerprint(load_components(str(folder))) == fingerprint(model)


def test_committed_model_and_classifier_load_offline():
    from erasure.toyworld.model import CLASSIFIER_FILE, MODEL_DIR, load_toyworld_classifier
    from erasure.toyworld.settings import SAMPLING

    model = load_components("builtin:toyworld")
    assert model.vae is None and model.defaults == SAMPLING.model_dump()  # one home: settings.SAMPLING
    assert load_components(str(MODEL_DIR)).unet.config == model.unet.config
    classifier = load_toyworld_classifier()
    assert CLASSIFIER_FILE.stat().st_size < 2_000_000 and classifier is not None


def test_erasing_a_colour_lowers_its_accuracy_and_keeps_the_others(tmp_path):
    """A fast end-to-end check on the committed toy model (few images and steps)."""
    from erasure.erase import erase
    from erasure.evaluate import evaluate_request
    from erasure.spec import parse_request

    request = parse_request({
        "concepts": [{"name": "red", "anchor": "white"}],
        "preserve": {"concepts": ["green", "blue", "yellow", "purple", "orange", "cyan", "white"], "lam1": 5, "lam2": 5},
        "method": {"images_per_concept": 4, "lora_steps": 30},
    })
    erase(request, tmp_path / "out")
    result = evaluate_request(tmp_path / "out" / "model", request)
    base, erased = result.base_metrics, result.metrics
    assert base["acc_e"] >= 0.75  # the base model does draw red when asked
    assert erased["acc_e"] <= base["acc_e"] - 0.5  # erased: far below the base model
    assert erased["acc_g"] <= base["acc_g"] - 0.4  # synonyms too ("crimson", "scarlet")
    assert erased["acc_s"] >= base["acc_s"] - 0.1  # the other colours (the prior) still draw
