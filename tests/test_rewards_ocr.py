"""OCR reward: Flow-GRPO's target/normalisation/edit-distance convention against hand-computed values,
a pluggable recogniser, prompts without quotes, and a tiny random TrOCR (saved with save_pretrained,
loaded through the same from_pretrained path as a real checkpoint) end to end and through the
reward server. No network."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from diffalign.errors import UserError
from diffalign.rewards import get_reward, tiny
from diffalign.rewards.ocr import OCRReward, OCRTargetError, TransformersOCR, ocr_score, target_text

pytestmark = pytest.mark.usefixtures("one_thread")


def rand_images(n: int, seed: int = 0, h: int = 40, w: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255.0


@pytest.fixture(scope="module")
def trocr_dir(tmp_path_factory):
    return tiny.build_ocr(tmp_path_factory.mktemp("ocr") / "trocr")


def test_target_is_the_first_double_quoted_text():
    assert target_text('a shop sign that says "Open 24 Hours" at night') == "Open 24 Hours"
    assert target_text('two signs, "first" and "second"') == "first"
    assert target_text('an empty sign ""') == ""
    assert target_text("no quotes at all") is None
    assert target_text('an unmatched " quote') is None  # Flow-GRPO would take the rest of the prompt
    assert target_text("curly \u201cquotes\u201d are not quotes") is None


@pytest.mark.parametrize("recognized,target,kwargs,score,distance", [
    ("Hello World", "Hello World", {}, 1.0, 0),
    ("HELLOWORLD", "hello world", {}, 1.0, 0),                  # case and spaces are normalised away
    ("the OPEN sign", "open", {}, 1.0, 0),                       # target inside the text: no penalty
    ("opem", "open", {}, 0.75, 1),                               # one substitution / 4
    ("oepn", "open", {}, 0.5, 2),                                # a swap is two edits (Levenshtein, not Damerau)
    ("hello world", "hello, world!", {}, 1 - 2 / 12, 2),         # punctuation is kept: "hello,world!" has 12
    ("", "open", {}, 0.0, 4),                                    # nothing recognised
    ("xyzxyzxyz", "ab", {}, 0.0, 2),                             # distance 9 clipped at len(target) = 2
    ("", "", {}, 1.0, 0),                                        # empty target: 1 when nothing is read ...
    ("abc", "", {}, 0.0, 1),                                     # ... else 0 (normaliser max(len, 1) = 1)
    ("", "   ", {}, 1.0, 0),                                     # only spaces: an empty target
    ("OPEN", "open", {"lowercase": False}, 0.0, 4),
    ("helloworld", "hello world", {"strip_spaces": False}, 1 - 1 / 11, 1),
    ("xopenx", "open", {"substring_match": False}, 0.5, 2),
])
def test_ocr_score_hand_computed(recognized, target, kwargs, score, distance):
    pytest.importorskip("rapidfuzz")
    s, d = ocr_score(recognized, target, **kwargs)
    assert d == distance
    assert s == pytest.approx(score, abs=1e-12)


def test_missing_rapidfuzz_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidfuzz", None)
    monkeypatch.setitem(sys.modules, "rapidfuzz.distance", None)
    with pytest.raises(UserError, match=r"rapidfuzz.*pip install 'diffalign\[rewards\]'"):
        ocr_score("a", "b")
    reward = OCRReward(recognizer=lambda images: ["x"] * len(images))
    with pytest.raises(UserError, match=r"pip install 'diffalign\[rewards\]'"):
        reward(rand_images(1), ['"x"'])  # at load, before any recognition


class UpperEngine:
    """A stand-in engine: reads "TEXT<i>" off image i via its mean red level, records its calls."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, images):
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
        self.calls.append(len(images))
        return [f"TEXT{round(im.getpixel((0, 0))[0] / 50)}" for im in images]


ENGINE = UpperEngine()


def flat_images(levels: list[int]) -> torch.Tensor:
    return torch.stack([torch.full((3, 8, 8), v / 255.0) for v in levels])


def test_pluggable_recognizer_and_batches():
    pytest.importorskip("rapidfuzz")
    engine = UpperEngine()
    reward = get_reward("ocr", recognizer=engine, batch_size=2)
    imgs = flat_images([0, 50, 100, 150, 200])  # the engine reads TEXT0 .. TEXT4
    prompts = ['"text0"', 'a sign "text 1"', '"TEXTX"', '"text33"', 'a sign "Text4" on "other"']
    out = reward(imgs, prompts)
    # TEXT2 vs textx: 1 substitution / 5; TEXT3 vs text33: 1 insertion / 6
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 1.0, 0.8, 1 - 1 / 6, 1.0]))
    assert out.scores.dtype == torch.float32 and set(out.details) == {"ocr"}
    assert engine.calls == [2, 2, 1]  # micro-batches of batch_size
    assert reward.recognize(imgs[:2]) == ["TEXT0", "TEXT1"]
    # an engine named "module:attr", as a config can give it
    by_name = get_reward("ocr", recognizer=f"{__name__}:ENGINE")
    torch.testing.assert_close(by_name(imgs, prompts).scores, out.scores)
    bad = OCRReward(recognizer=lambda images: ["only one"])
    with pytest.raises(UserError, match="one string per image; got list of 1 for 2 images"):
        bad(imgs[:2], ['"a"', '"b"'])
    with pytest.raises(UserError, match="cannot import recognizer 'no_such_module:x'"):
        OCRReward(recognizer="no_such_module:x")


def test_prompts_without_quotes(capsys):
    pytest.importorskip("rapidfuzz")
    engine = UpperEngine()
    imgs = flat_images([0, 50, 100])
    prompts = ['"text0"', "a plain prompt", "a plain prompt"]
    with pytest.raises(OCRTargetError, match=r"prompt 'a plain prompt' has no text in double quotes "
                                             r"\(2 of 3 prompts.*missing_text=zero"):
        OCRReward(recognizer=engine)(imgs, prompts)
    with pytest.raises(UserError, match="missing_text must be one of error, zero"):
        OCRReward(recognizer=engine, missing_text="skip")
    reward = OCRReward(recognizer=engine, missing_text="zero")
    out = reward(imgs, prompts)
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.0, 0.0]))
    assert engine.calls[-1] == 1  # images without a target are not recognised
    reward(imgs, prompts)
    err = capsys.readouterr().err
    assert err.count("warning: reward 'ocr': prompt 'a plain prompt' has no text in double quotes") == 1
    assert "2 such images so far" in err


def test_tiny_trocr_end_to_end(trocr_dir):
    pytest.importorskip("rapidfuzz")
    imgs = rand_images(5)
    reward = get_reward(f"ocr={trocr_dir}", device="cpu", batch_size=2, max_new_tokens=8)
    assert isinstance(reward, OCRReward) and not reward.loaded  # lazy
    texts = reward.recognize(imgs)
    assert len(texts) == 5 and all(isinstance(t, str) and t for t in texts)
    assert len(set(texts)) > 1  # what is read depends on the image
    # prompts asking for what the tiny model reads (1.0) or that with its last letter changed
    # (one substitution: 1 - 1/len after normalisation)
    prompts = [f'a poster that says "{t}"' for t in texts]
    changed = texts[1][:-1] + ("Q" if texts[1][-1].lower() != "q" else "Z")
    prompts[1] = f'a poster that says "{changed}"'
    out = reward(imgs, prompts)
    n1 = len(changed.replace(" ", ""))
    expected = torch.ones(5)
    expected[1] = 1 - 1 / n1
    assert out.scores.shape == (5,) and out.scores.dtype == torch.float32
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    torch.testing.assert_close(out.scores, expected)
    # batched == one image at a time, and the recogniser alone reads the same strings
    one = get_reward(f"ocr={trocr_dir}", device="cpu", batch_size=1, max_new_tokens=8)
    assert one.recognize(imgs) == texts
    torch.testing.assert_close(one(imgs, prompts).scores, out.scores, rtol=0, atol=0)
    direct = TransformersOCR(str(trocr_dir), device="cpu", max_new_tokens=8, batch_size=16)
    assert direct(reward_images_as_pil(imgs)) == texts
    # a checkpoint saved with transformers 5's combined processor_config.json reads the same
    import shutil

    from transformers import AutoImageProcessor, AutoTokenizer, TrOCRProcessor

    combined = trocr_dir.parent / "combined"
    shutil.copytree(trocr_dir, combined, ignore=shutil.ignore_patterns("preprocessor_config.json", "tokenizer*",
                                                                        "vocab.json", "merges.txt",
                                                                        "special_tokens_map.json"))
    TrOCRProcessor(image_processor=AutoImageProcessor.from_pretrained(trocr_dir),
                   tokenizer=AutoTokenizer.from_pretrained(trocr_dir)).save_pretrained(combined)
    assert (combined / "processor_config.json").is_file() and not (combined / "preprocessor_config.json").exists()
    assert TransformersOCR(str(combined), device="cpu", max_new_tokens=8)(reward_images_as_pil(imgs)) == texts
    # PIL input of other sizes goes through the same path
    pil = [Image.new("RGB", (64, 30), (200, 10, 10)), Image.new("RGB", (20, 50), (0, 0, 0))]
    mixed = reward(pil, ['"abc"', '"xyz"'])
    assert mixed.scores.shape == (2,) and ((mixed.scores >= 0) & (mixed.scores <= 1)).all()


def reward_images_as_pil(imgs):
    from diffalign.rewards.ocr import to_pil_images

    return to_pil_images(imgs)


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"ocr: path '/does/not/exist' does not exist"):
        get_reward("ocr=/does/not/exist", device="cpu", recognizer=None)(rand_images(1), ['"a"'])


def test_ocr_through_reward_server(trocr_dir):
    """``serve-reward --reward ocr=DIR``'s path: the registry spec behind RewardServer, RemoteReward in front."""
    pytest.importorskip("rapidfuzz")
    from diffalign.rewards.server import RemoteReward, RemoteRewardError, RewardServer

    imgs = rand_images(3, seed=1)
    local = get_reward(f"ocr={trocr_dir}", device="cpu", max_new_tokens=8)
    texts = local.recognize(imgs)
    prompts = [f'"{texts[0]}"', '"nothing like it"', f'the word "{texts[2][:4]}"']
    expected = local(imgs, prompts).scores
    served = get_reward(f"ocr={trocr_dir}", device="cpu", max_new_tokens=8)
    with RewardServer(served, "127.0.0.1", 0, access_log=False) as server:
        remote = RemoteReward(server.url, retries=0)
        out = remote(imgs, prompts)  # PNG round trip: exact for uint8 pixels
        assert remote.name == "ocr" and remote.needs_prompt
        torch.testing.assert_close(out.scores, expected, rtol=0, atol=0)
        assert out.scores[0] == 1.0
        # a prompt without a target is the client's mistake: 400 with the reason, not retried
        with pytest.raises(RemoteRewardError, match="answered 400: reward 'ocr': prompt 'no quotes' has no text"):
            remote(imgs[:1], ["no quotes"])
