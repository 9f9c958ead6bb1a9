"""Testbed preference pairs: Pick-a-Pic schema, ties, labels follow the hidden utility, style mismatch."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffalign.testbed import (
    PICKAPIC_COLUMNS,
    HiddenUtility,
    StyleReward,
    WorldSampler,
    apply_target_style,
    decode_pairs,
    is_target_style,
    make_pairs,
    parse_caption,
    render,
    train_prompts,
    world_sampler,
)
from diffalign.testbed.reward import TestbedReward

EXPECTED_TYPES = {
    "caption": "string", "jpg_0": "binary", "jpg_1": "binary", "label_0": "double", "label_1": "double",
    "has_label": "bool", "are_different": "bool", "model_0": "string", "model_1": "string",
    "ranking_id": "int64", "user_id": "int64", "best_image_uid": "string", "image_0_uid": "string",
    "image_1_uid": "string",
}


@pytest.fixture(scope="module")
def prompts():
    return train_prompts(100)


@pytest.fixture(scope="module")
def pairs(prompts, tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    make_pairs(world_sampler, prompts, 240, seed=0, out_path=path)
    return pq.read_table(path)


def _chosen_rejected(table):
    a, b = decode_pairs(table)
    l0 = np.asarray(table.column("label_0").to_pylist())
    keep = l0 != 0.5
    first = (l0 == 1.0)[:, None, None, None]
    return np.where(first, a, b)[keep], np.where(first, b, a)[keep], keep


def test_schema(pairs):
    assert {f.name: str(f.type) for f in pairs.schema if f.name in EXPECTED_TYPES} == EXPECTED_TYPES
    assert set(EXPECTED_TYPES) <= set(pairs.column_names) and tuple(pairs.column_names) == PICKAPIC_COLUMNS
    d = pairs.to_pydict()
    assert pairs.num_rows == 240
    for l0, l1 in zip(d["label_0"], d["label_1"]):
        assert (l0, l1) in {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
    assert all(d["has_label"]) and all(d["are_different"])
    assert len(set(d["image_0_uid"] + d["image_1_uid"])) == 480
    for l0, l1, best, u0, u1 in zip(d["label_0"], d["label_1"], d["best_image_uid"], d["image_0_uid"], d["image_1_uid"]):
        assert best == (u0 if l0 > l1 else u1 if l1 > l0 else "")
    assert all(c in set(train_prompts(100)) for c in d["caption"])
    a, _ = decode_pairs(pairs)
    assert a.shape[1:] == (32, 32, 3)


def test_ties_and_labels_follow_utility(pairs):
    l0 = np.asarray(pairs.column("label_0").to_pylist())
    ties = (l0 == 0.5).mean()
    assert 0.02 < ties < 0.6
    chosen, rejected, keep = _chosen_rejected(pairs)
    caps = [c for c, k in zip(pairs.column("caption").to_pylist(), keep) if k]
    u = HiddenUtility()
    agree = (u(chosen, caps) > u(rejected, caps)).float().mean()
    assert float(agree) > 0.7
    # both ways are represented (image 0 is not always the winner)
    assert 0.2 < (l0[keep] == 1.0).mean() < 0.8


def test_deterministic(prompts):
    s = WorldSampler(error_rate=0.5)
    t1, t2 = make_pairs(s, prompts, 20, seed=3), make_pairs(s, prompts, 20, seed=3)
    assert t1.equals(t2)
    assert not t1.equals(make_pairs(s, prompts, 20, seed=4))


def test_world_sampler_error_rate(prompts):
    ps = prompts[:80]
    r = TestbedReward()
    clean = WorldSampler(error_rate=0.0, warm_rate=0.0)(ps, list(range(80)))
    noisy = WorldSampler(error_rate=1.0, warm_rate=0.0)(ps, list(range(80)))
    assert clean.shape == (80, 3, 32, 32) and float(clean.min()) >= 0 and float(clean.max()) <= 1
    assert r.evaluate(clean, ps)["score"].mean() >= 0.95
    assert r.evaluate(noisy, ps)["score"].mean() <= 0.5
    assert WorldSampler(resolution=64)(ps[:2], [0, 1]).shape == (2, 3, 64, 64)


def test_style_mismatch(prompts):
    table = make_pairs(world_sampler, prompts, 200, seed=1, style_mismatch=True)
    chosen, rejected, keep = _chosen_rejected(table)
    base = world_sampler(prompts[:100], list(range(100)))
    base_rate = is_target_style(base).mean()
    assert base_rate < 0.1
    assert is_target_style(chosen).mean() > 0.9
    assert is_target_style(rejected).mean() < 0.1
    # restyling keeps the objects: faithfulness of chosen images is unchanged by the recolour
    plain = make_pairs(world_sampler, prompts, 200, seed=1)
    pc, _, keep2 = _chosen_rejected(plain)
    assert np.array_equal(keep, keep2)
    caps = [c for c, k in zip(table.column("caption").to_pylist(), keep) if k]
    r = TestbedReward()
    assert abs(r.evaluate(chosen, caps)["score"].mean() - r.evaluate(pc, caps)["score"].mean()) < 0.02


def test_apply_target_style_and_style_reward():
    s = parse_caption("two small white circles")
    img = render(s, 32, None, seed=0)[None]
    warm = apply_target_style(img)
    assert not is_target_style(img)[0] and is_target_style(warm)[0]
    out = StyleReward()(np.concatenate([img, warm]), [ "two small white circles"] * 2)
    assert float(out.scores[1]) > float(out.scores[0]) + 0.4
    assert float(out.details["faithfulness"][0]) == float(out.details["faithfulness"][1]) == 1.0


def test_images_per_prompt_best_vs_worst(prompts):
    """K=4: each pair shows the best and the worst of four samples, so the utility gap grows
    and the best-of-4 image beats the K=2 chosen image on average; the winner is still random
    in position; and K < 2 is refused."""
    s = WorldSampler(error_rate=0.5, warm_rate=0.0)
    u = HiddenUtility()

    def gaps_and_chosen(k):
        t = make_pairs(s, prompts, 120, seed=2, images_per_prompt=k, temperature=1e-6, tie_margin=1e-9)
        a, b = decode_pairs(t)
        caps = t.column("caption").to_pylist()
        ua, ub = u(a, caps).numpy(), u(b, caps).numpy()
        l0 = np.asarray(t.column("label_0").to_pylist())
        keep = l0 != 0.5
        # near-zero temperature: the label is the argmax of the utility, position either way
        assert np.all((ua > ub)[keep] == (l0 == 1.0)[keep])
        assert 0.2 < (l0[keep] == 1.0).mean() < 0.8
        return np.abs(ua - ub).mean(), np.maximum(ua, ub).mean()

    gap2, best2 = gaps_and_chosen(2)
    gap4, best4 = gaps_and_chosen(4)
    assert gap4 > 1.3 * gap2 and best4 > best2
    with pytest.raises(ValueError, match="images_per_prompt"):
        make_pairs(s, prompts, 4, images_per_prompt=1)
