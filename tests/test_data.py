"""Pick-a-Pic data path: schema, swap, ties, bad rows skipped and counted, transforms."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffalign.config import DataOptions
from diffalign.data.pickapic import PreferencePairStream, load_preference_dataset, pair_dataloader
from diffalign.data.toy import PICKAPIC_SCHEMA_TYPES, make_toy_pickapic_rows, pickapic_table, write_toy_pickapic
from diffalign.errors import UserError


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_toy_data_has_pickapic_schema_and_ties(tmp_path):
    path = write_toy_pickapic(tmp_path, n=40, size=16, seed=3)
    table = pq.read_table(path)
    assert set(PICKAPIC_SCHEMA_TYPES) <= set(table.column_names)
    assert str(table.schema.field("jpg_0").type) == "binary"
    labels = table.column("label_0").to_pylist()
    assert 0.5 in labels and 0.0 in labels and 1.0 in labels  # ties and both orders present
    from PIL import Image

    Image.open(io.BytesIO(table.column("jpg_1")[0].as_py())).verify()


def test_one_schema_for_training_and_reward_tools():
    from diffalign.data import schema
    from diffalign.rewards import pairs

    # the loader's minimum is a subset of what the reward tools read; both come from data/schema.py
    assert set(schema.REQUIRED_COLUMNS) < set(schema.PAIR_COLUMNS) <= set(PICKAPIC_SCHEMA_TYPES)
    assert pairs.check_columns.__defaults__ == (schema.PAIR_COLUMNS,)


def test_chosen_first_ties_dropped_and_counted(toy_pairs):
    opts = DataOptions(resolution=32, random_flip=False)
    ds = load_preference_dataset(toy_pairs, opts)
    n_ties = sum(1 for x in ds["label_0"] if x == 0.5)
    # one epoch of usable pairs, plus the first pair of the next epoch (which carries the count
    # of ties skipped at the very end of the first)
    examples = _take(PreferencePairStream(ds, opts, seed=0), len(ds) - n_ties + 1)
    # Toy chosen images are warm (red > blue), rejected ones cool, whichever column stores them.
    for e in examples:
        w, l = e["pixels_w"], e["pixels_l"]
        assert w[0].mean() > w[2].mean() and l[2].mean() > l[0].mean()
    first_epoch = sum(sum(e["skipped"].values()) for e in examples[:-1])
    assert first_epoch <= n_ties <= first_epoch + sum(examples[-1]["skipped"].values())
    assert all(set(e["skipped"]) <= {"tie"} for e in examples)


def test_ties_kept_when_asked(toy_pairs):
    opts = DataOptions(resolution=32, drop_ties=False)
    ds = load_preference_dataset(toy_pairs, opts)
    examples = _take(PreferencePairStream(ds, opts, seed=0), len(ds))
    assert sum(sum(e["skipped"].values()) for e in examples) == 0


def test_bad_rows_skipped_with_reasons(tmp_path):
    cols = make_toy_pickapic_rows(8, size=16, seed=0, tie_fraction=0.0)
    cols["jpg_0"][0] = b"not a jpeg"  # corrupt
    cols["jpg_1"][1] = cols["jpg_1"][1][: len(cols["jpg_1"][1]) // 2]  # truncated
    cols["label_0"][2] = float("nan")
    cols["label_0"][3] = 3.0  # out of range
    cols["has_label"][4] = False
    cols["are_different"][5] = False
    pq.write_table(pickapic_table(cols), tmp_path / "bad.parquet")
    opts = DataOptions(resolution=16)
    ds = load_preference_dataset(str(tmp_path / "bad.parquet"), opts)
    examples = _take(PreferencePairStream(ds, opts, seed=0), 2)
    skipped = {}
    for e in examples:
        for k, v in e["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"bad_image": 2, "bad_label": 2, "unlabeled": 1, "identical": 1}


def test_missing_column_is_one_clear_error(tmp_path):
    cols = make_toy_pickapic_rows(4, size=16)
    del cols["jpg_1"]
    pq.write_table(pickapic_table(cols), tmp_path / "x.parquet")
    with pytest.raises(UserError, match="'jpg_1'"):
        load_preference_dataset(str(tmp_path / "x.parquet"), DataOptions())


def test_all_rows_unusable_raises_instead_of_spinning(tmp_path):
    cols = make_toy_pickapic_rows(4, size=16, tie_fraction=1.0)
    pq.write_table(pickapic_table(cols), tmp_path / "ties.parquet")
    opts = DataOptions(resolution=16)
    ds = load_preference_dataset(str(tmp_path / "ties.parquet"), opts)
    with pytest.raises(UserError, match="no usable preference pair"):
        next(iter(PreferencePairStream(ds, opts)))


def test_ranks_get_disjoint_rows_and_resolution(toy_pairs):
    opts = DataOptions(resolution=24, random_flip=False, drop_ties=False)
    ds = load_preference_dataset(toy_pairs, opts)
    half = len(ds) // 2
    a = _take(PreferencePairStream(ds, opts, seed=0, rank=0, world_size=2), half)
    b = _take(PreferencePairStream(ds, opts, seed=0, rank=1, world_size=2), half)
    assert a[0]["pixels_w"].shape == (3, 24, 24)
    keys_a = {e["pixels_w"].sum().item() for e in a}
    keys_b = {e["pixels_w"].sum().item() for e in b}
    assert not keys_a & keys_b


def test_empty_prompt_fraction(toy_pairs):
    opts = DataOptions(resolution=16, empty_prompt_prob=0.5, drop_ties=False)
    loader = pair_dataloader(toy_pairs, opts, batch_size=8, seed=0)
    it = iter(loader)
    captions = [c for _ in range(12) for c in next(it).captions]
    frac = sum(c == "" for c in captions) / len(captions)
    assert 0.35 < frac < 0.65


def test_flip_applies_to_both_images_of_a_pair(tmp_path):
    from PIL import Image

    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, :8] = 255  # left half white
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    cols = make_toy_pickapic_rows(16, size=16, tie_fraction=0.0)
    cols["jpg_0"] = [buf.getvalue()] * 16
    cols["jpg_1"] = [buf.getvalue()] * 16
    pq.write_table(pickapic_table(cols), tmp_path / "f.parquet")
    opts = DataOptions(resolution=16, random_flip=True)
    ds = load_preference_dataset(str(tmp_path / "f.parquet"), opts)
    flips = []
    for e in _take(PreferencePairStream(ds, opts, seed=0), 16):
        w_left = e["pixels_w"][:, :, :8].mean() > 0
        l_left = e["pixels_l"][:, :, :8].mean() > 0
        assert w_left == l_left
        flips.append(bool(w_left))
    assert 0 < sum(flips) < 16  # both orientations occur


def test_one_image_decoder_for_data_rewards_and_testbed():
    from PIL import Image

    from diffalign.data.pickapic import decode_image as data_decode
    from diffalign.rewards import decode_image_bytes
    from diffalign.testbed.world import decode_image as testbed_decode

    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, format="PNG")  # fully transparent red
    png = buf.getvalue()
    assert np.asarray(data_decode(png)).min() == 255  # composited onto white, everywhere
    assert float(decode_image_bytes(png).min()) == 1.0
    assert testbed_decode(png).min() == 255
    for decode in (data_decode, decode_image_bytes, testbed_decode):
        with pytest.raises(ValueError, match="cannot decode image bytes"):
            decode(b"not an image")
