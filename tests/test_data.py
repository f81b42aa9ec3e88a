"""Readers, preprocessing, the leave-one-out split and bad-input errors."""

import numpy as np
import pandas as pd
import pytest
from tests.conftest import dataset_from_frame

from gfmfr.config import DataConfig
from gfmfr.data.dataset import load_dataset
from gfmfr.data.errors import DataError


def frame(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def test_leave_one_out_by_timestamp_with_stable_ties():
    d = dataset_from_frame(
        frame(
            [
                ("a", "1", 5, 30),
                ("a", "2", 5, 10),
                ("a", "3", 5, 20),
                ("a", "4", 5, 20),  # 3 and 4 tie: file order
                ("b", "1", 5, 1),
                ("b", "2", 5, 2),
                ("b", "3", 5, 3),
                ("c", "1", 5, 1),
                ("c", "2", 5, 2),  # fewer than 3: dropped
            ]
        )
    )
    assert d.n_users == 2 and d.n_items == 4
    a = list(d.user_ids).index("a")

    def ids(idx):
        return [d.item_ids[i] for i in np.atleast_1d(idx)]

    assert ids(d.user_train(a)) == ["2", "3"]
    assert ids(d.valid_items[a]) == ["4"] and ids(d.test_items[a]) == ["1"]
    assert d.report["dropped"]["users_with_fewer_than_3"] == 1
    assert d.report["dropped"]["interactions_of_users_with_fewer_than_3"] == 2
    assert d.report["train"] == 3 and d.report["valid"] == 2 and d.report["test"] == 2


def test_threshold_duplicates_and_kcore_are_counted():
    rows = [("a", str(i), 5 if i % 2 else 1, i) for i in range(8)] + [("a", "1", 5, 100)]
    rows += [("b", str(i), 5, i) for i in range(1, 8, 2)]
    d = dataset_from_frame(frame(rows), DataConfig(rating_threshold=4))
    dropped = d.report["dropped"]
    assert dropped["below_rating_threshold"] == 4
    assert dropped["duplicate_pair"] == 1
    a = list(d.user_ids).index("a")
    # the repeat of item 1 at t=100 was dropped: the earliest interaction stays
    assert [d.item_ids[i] for i in d.user_train(a)] == ["1", "3"]
    with pytest.raises(DataError, match="line 10.*repeated"):
        dataset_from_frame(frame(rows), DataConfig(duplicates="error"))
    d2 = dataset_from_frame(frame(rows + [("c", "99", 5, 1), ("c", "1", 5, 2), ("c", "3", 5, 3)]), DataConfig(kcore=2))
    assert d2.report["dropped"]["kcore"] >= 1 and "99" not in d2.item_ids


def test_generic_folder_and_items(tmp_path):
    (tmp_path / "interactions.csv").write_text(
        "user_id,item_id,rating,timestamp\n"
        + "".join(f"u{u},i{i},4,{u * 10 + i}\n" for u in range(3) for i in range(4))
    )
    (tmp_path / "items.csv").write_text("item_id,text,image\ni0,first,img/0.jpg\ni1,second,\ni2,,\ni3,fourth,\n")
    d = load_dataset(DataConfig(dataset=str(tmp_path)))
    assert d.n_users == 3 and d.n_items == 4 and d.report["interactions"] == 12
    assert d.item_text[list(d.item_ids).index("i2")] is None
    assert d.report["image_files_missing"] == 1  # img/0.jpg does not exist: warned and counted


@pytest.mark.parametrize(
    "content,message",
    [
        ("user,item_id\n1,2\n", r"interactions.csv, line 1, field 'user_id': missing column"),
        ("user_id,item_id,rating\n1,2,4\n1,3,x\n", r"interactions.csv, line 3, field 'rating'.*'x' is not a number"),
        ("user_id,item_id,timestamp\n1,2,4\n1,3,yesterday\n", r"line 3, field 'timestamp'"),
    ],
)
def test_bad_interactions_name_file_line_field(tmp_path, content, message):
    (tmp_path / "interactions.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(dataset=str(tmp_path)))


def test_unknown_item_is_an_error(tmp_path):
    (tmp_path / "interactions.csv").write_text("user_id,item_id\n1,a\n1,b\n1,zzz\n")
    (tmp_path / "items.csv").write_text("item_id,text\na,x\nb,y\n")
    with pytest.raises(DataError, match=r"line 4, field 'item_id'.*'zzz' is not in"):
        load_dataset(DataConfig(dataset=str(tmp_path)))


def test_fedvlr_layout_and_feature_checks(tmp_path):
    (tmp_path / "inter.csv").write_text(
        "userId,itemId,rating,timestamp\n" + "".join(f"{u},{i},5,{i}\n" for u in range(3) for i in range(4))
    )
    np.save(tmp_path / "text_features.npy", np.ones((4, 8), np.float32))
    d = load_dataset(DataConfig(dataset=str(tmp_path)))
    assert d.item_features["text"].shape == (4, 8)
    np.save(tmp_path / "image_features.npy", np.ones((3, 8), np.float32))
    with pytest.raises(DataError, match="image_features.npy.*3 rows, expected 4"):
        load_dataset(DataConfig(dataset=str(tmp_path)))
    bad = np.ones((4, 8), np.float32)
    bad[2, 5] = np.nan
    np.save(tmp_path / "image_features.npy", bad)
    with pytest.raises(DataError, match=r"image_features.npy, line 2, field '5'.*non-finite"):
        load_dataset(DataConfig(dataset=str(tmp_path)))


def test_recbole_atomic_layout(tmp_path):
    (tmp_path / "toy.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t3\t{i}\n" for u in range(1, 4) for i in range(1, 6))
    )
    (tmp_path / "toy.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\tMovie {i}\t199{i}\tDrama\n" for i in range(1, 6))
    )
    d = load_dataset(DataConfig(dataset=str(tmp_path)))
    assert d.n_items == 5 and d.item_text[0] == "Movie 1 (1991). Genres: Drama"


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_dataset(DataConfig(dataset=str(tmp_path / "nope")))


def test_random_bytes_and_rows_in_every_reader_raise_only_data_errors(tmp_path_factory):
    """Whatever a data folder holds (random bytes, or rows of random cells under any known header), in
    each layout (generic, FedVLR, RecBole atomic) and in items.csv: it loads, or raises DataError."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gfmfr.config import DataConfig
    from gfmfr.data.dataset import build_dataset
    from gfmfr.data.errors import DataError
    from gfmfr.data.sources import read_folder, read_items_csv

    headers = [
        "user_id,item_id,rating,timestamp",
        "userId,itemId",
        "a,b",
        "",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    ]
    cell = st.sampled_from(["1", "2", "x", "", "3.5", "-1", "1e400", "nan", "é", '"', "0"])
    table = st.tuples(st.sampled_from(headers), st.lists(st.lists(cell, min_size=1, max_size=5), max_size=8)).map(
        lambda t: "\n".join([t[0]] + [("\t" if "\t" in t[0] else ",").join(r) for r in t[1]]).encode()
    )

    @settings(max_examples=150, deadline=None)
    @given(
        st.sampled_from(["interactions.csv", "inter.csv", "ml.inter"]),
        st.one_of(st.binary(max_size=200), table),
        st.one_of(st.none(), st.binary(max_size=80), table),
    )
    def check(name, content, items):
        folder = tmp_path_factory.mktemp("fuzz")
        (folder / name).write_bytes(content)
        if items is not None:
            (folder / "items.csv").write_bytes(items)
        try:
            build_dataset(read_folder(folder), DataConfig(), name="fuzz")
            if items is not None:
                read_items_csv(folder / "items.csv", folder)
        except DataError:
            pass

    check()


def _published_layout(folder, header="userID,itemID,rating,timestamp,split_label", labels=None, dtype=np.float16):
    """A FedVLR-layout folder: 3 users x 4 items, the last two of each user labelled validation, test."""
    labels = labels or {0: 0, 1: 0, 2: 1, 3: 2}
    rows = "".join(f"{u},{i},1.0,{100 - i},{labels[i]}\n" for u in range(3) for i in range(4))
    (folder / "inter.csv").write_text(header + "\n" + rows)
    np.save(folder / "text_features.npy", np.arange(4 * 6).reshape(4, 6).astype(dtype))
    return folder


@pytest.mark.parametrize(
    "header",
    [
        "userID,itemID,rating,timestamp,split_label",
        "userId,itemId,rating,timestamp,split_label",
        "user_id,item_id,Rating,TIMESTAMP,splitLabel",
    ],
)
def test_published_layout_reads_any_header_case_and_honours_its_split(tmp_path, header):
    d = load_dataset(DataConfig(dataset=str(_published_layout(tmp_path, header))))
    # timestamps run backwards, so leave-one-out by time would hold out items 1 and 0: the labels win
    assert d.report["split"] == "split_label"
    assert list(d.item_ids[d.valid_items]) == ["2"] * 3 and list(d.item_ids[d.test_items]) == ["3"] * 3
    assert d.item_features["text"].dtype == np.float32 and d.item_features["text"].shape == (4, 6)
    by_time = load_dataset(DataConfig(dataset=str(tmp_path), split="leave-one-out"))
    assert by_time.report["split"] == "leave-one-out"
    assert list(by_time.item_ids[by_time.test_items]) == ["0"] * 3


def test_a_split_label_outside_0_2_or_a_second_test_row_names_its_line(tmp_path):
    _published_layout(tmp_path, labels={0: 0, 1: 0, 2: 1, 3: 7})
    with pytest.raises(DataError, match=r"inter.csv, line 5, field 'split_label'.*not one of 0"):
        load_dataset(DataConfig(dataset=str(tmp_path)))
    _published_layout(tmp_path, labels={0: 0, 1: 2, 2: 1, 3: 2})
    with pytest.raises(DataError, match=r"inter.csv, line 3, field 'split_label'.*second test"):
        load_dataset(DataConfig(dataset=str(tmp_path)))


def test_a_held_out_repeat_of_a_training_item_is_not_evaluated(tmp_path):
    # user a's test item x repeats a training item: full ranking masks it, so a is not tested (and
    # counted as a duplicate); user b keeps its given validation and test items
    rows = "user_id,item_id,timestamp,split_label\na,x,1,0\na,y,2,0\na,x,3,2\nb,x,1,0\nb,y,2,1\nb,z,3,2\n"
    (tmp_path / "interactions.csv").write_text(rows)
    d = load_dataset(DataConfig(dataset=str(tmp_path)))
    a, b = list(d.user_ids).index("a"), list(d.user_ids).index("b")
    assert d.test_items[a] == -1 and d.valid_items[a] == -1
    assert d.item_ids[d.valid_items[b]] == "y" and d.item_ids[d.test_items[b]] == "z"
    assert d.report["dropped"]["duplicate_pair"] == 1 and d.report["test"] == 1


def test_feature_files_beside_raw_text_follow_data_features(tmp_path, monkeypatch):
    _published_layout(tmp_path)
    (tmp_path / "items.csv").write_text("itemID,asin,text\n" + "".join(f"{i},A{i},item {i}\n" for i in range(4)))
    from gfmfr.data import encoders

    monkeypatch.setattr(
        encoders,
        "encode_texts",
        lambda texts, batch_size=64: (
            np.full((len(texts), 3), 2.0, np.float32),
            np.ones(len(texts), bool),
            {"encoded": len(texts)},
        ),
    )
    widths = {}
    for choice in ("precomputed", "encoded", "both"):
        d = load_dataset(DataConfig(dataset=str(tmp_path), features=choice))
        assert d.item_text == [f"item {i}" for i in range(4)]
        widths[choice] = encoders.dataset_features(d, ("text", "image")).features["text"].shape[1]
    assert widths == {"precomputed": 6, "encoded": 3, "both": 9}
    np.save(tmp_path / "text_features.npy", np.ones((5, 6), np.float32))  # one row more than items.csv
    with pytest.raises(DataError, match=r"text_features.npy: has 5 rows, expected 4"):
        load_dataset(DataConfig(dataset=str(tmp_path)))
