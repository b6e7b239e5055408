"""``hmlib.cluster`` input and contact sheet: folders of mixed files, parquet mirrors, hub ids, the HTML page."""
from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from cluster_fakes import WEIRD_NAME, write_mixed_folder
from datafactory import balanced_labels, class_patterns, write_parquet_split, write_tiny_dataset
from hmlib.cluster import decode
from hmlib.cluster.images import ClusterInputError, choose_split, input_name, load_images
from hmlib.cluster.sheet import member_rows, write_contact_sheet
from hmlib.config import DataConfig
from hmlib.data.loading import preprocess_settings
from hmlib.data.preprocess import preprocess_images
from hmlib.data.registry import DatasetSpec


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "mixed"
    return root, write_mixed_folder(root)


# ------------------------------------------------------------------------------------------------ folders

def test_folder_reads_every_image_kind_in_sorted_order_through_hmlib_preprocessing(mixed):
    root, files = mixed
    collection = load_images(root, progress=False)
    assert collection.source == "folder" and collection.location == str(root.resolve())
    assert collection.names == files["images"]  # recursive, sorted, hidden files left out, no extension trusted
    assert collection.images.dtype == np.uint8 and collection.images.shape == (len(files["images"]), 28, 28)
    # exactly what hmlib's own preprocessing makes of these files (luminance, padding, resize, polarity)
    expected = preprocess_images([root / name for name in files["images"]], num_workers=1, progress=False)
    np.testing.assert_array_equal(collection.images, expected)
    assert collection.inverted >= 2  # the dark-ink TIFF and the dark-ink-on-transparency PNG were flipped
    assert collection.preprocessing == preprocess_settings(DatasetSpec(root.name, local_dir=root.resolve()),
                                                           DataConfig(), derived=False)


def test_folder_skips_broken_images_with_reasons_and_ignores_non_images(mixed):
    root, files = mixed
    collection = load_images(root, progress=False)
    assert [name for name, _ in collection.skipped] == files["skipped"]
    reasons = dict(collection.skipped)
    assert "truncated" in reasons["nested/truncated.png"]
    assert "Pillow cannot identify" in reasons["garbage.jpg"]
    assert all("\n" not in reason for reason in reasons.values())
    assert collection.ignored == files["ignored"]  # notes.txt, labels.csv: not images, not errors
    assert not any(name.startswith(".") or "/." in name for name in collection.names + collection.ignored)


def test_limit_keeps_the_first_images_in_order(mixed):
    root, files = mixed
    collection = load_images(root, progress=False, limit=4)
    assert collection.names == files["images"][:4]
    full = load_images(root, progress=False)
    np.testing.assert_array_equal(collection.images, full.images[:4])


def test_worker_processes_give_the_same_result_as_one(mixed, monkeypatch):
    root, _ = mixed
    monkeypatch.setattr(decode, "CHUNK", 3)  # several chunks, so the pool is used
    serial = load_images(root, progress=False, num_workers=1)
    parallel = load_images(root, progress=False, num_workers=2)
    assert parallel.names == serial.names and parallel.skipped == serial.skipped
    assert parallel.ignored == serial.ignored
    np.testing.assert_array_equal(parallel.images, serial.images)
    limited = load_images(root, progress=False, num_workers=2, limit=5)
    assert limited.names == serial.names[:5]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_hidden").mkdir()
    (tmp_path / "only_hidden" / ".DS_Store").write_bytes(b"\0\0")
    for name in ("empty", "only_hidden"):
        with pytest.raises(ClusterInputError, match="is empty"):
            load_images(tmp_path / name, progress=False)


def test_folder_without_images_is_an_error(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ClusterInputError, match=r"holds no images Pillow can read \(2 files: 1 not images, "
                                                r"1 unreadable; first skipped: broken.png"):
        load_images(folder, progress=False)


def test_missing_path_and_plain_file_are_errors(tmp_path):
    with pytest.raises(ClusterInputError, match="does not exist"):
        load_images(tmp_path / "nope", progress=False)
    with pytest.raises(ClusterInputError, match="does not exist"):
        load_images("./relative/nowhere", progress=False)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ClusterInputError, match="is a file; pass the folder"):
        load_images(tmp_path / "a.txt", progress=False)


def test_split_option_needs_table_input(mixed):
    with pytest.raises(ClusterInputError, match="--split applies to parquet or hub input"):
        load_images(mixed[0], progress=False, split="test")


# ------------------------------------------------------------------------------------------------ parquet

def test_parquet_folder_uses_the_test_split_in_row_order(tmp_path):
    folder = write_tiny_dataset(tmp_path, "shapes", splits={"train": 30, "test": 12}, seed=5)
    collection = load_images(folder, progress=False)
    assert (collection.source, collection.split, len(collection)) == ("parquet", "test", 12)
    assert collection.names == [str(i) for i in range(12)]
    # 28x28 dark-ground patterns pass preprocessing unchanged, so rows must come back as written, in order
    np.testing.assert_array_equal(collection.images, class_patterns(balanced_labels(12, 6, 6), 6, 28, 6))
    assert collection.location == str(folder / "test.parquet")
    assert load_images(folder, progress=False, split="train").names == [str(i) for i in range(30)]
    with pytest.raises(ClusterInputError, match=r"has splits \['test', 'train'\], not 'validation'"):
        load_images(folder, progress=False, split="validation")


def test_parquet_train_only_file_and_limit(tmp_path):
    folder = write_tiny_dataset(tmp_path, "trainonly", splits={"train": 10})
    assert load_images(folder, progress=False).split == "train"
    single = load_images(folder / "train.parquet", progress=False, limit=4)
    assert (single.source, single.names) == ("parquet", ["0", "1", "2", "3"])


def test_unlabeled_parquet_with_a_corrupt_row(tmp_path):
    import datasets

    good = [Image.fromarray(a) for a in class_patterns(np.arange(5) % 2, 2, 28)]
    rows = [{"bytes": b"garbage", "path": None} if i == 2 else img for i, img in enumerate(good)]
    path = tmp_path / "unlabeled" / "test.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_dict({"picture": rows}, features=datasets.Features({"picture": datasets.Image()})
                               ).to_parquet(str(path))
    collection = load_images(path.parent, progress=False)
    assert collection.names == ["0", "1", "3", "4"]
    assert [name for name, _ in collection.skipped] == ["2"]


def test_mirror_root_asks_for_one_dataset(tmp_path):
    write_tiny_dataset(tmp_path / "mirror", "alpha", splits={"test": 6})
    write_tiny_dataset(tmp_path / "mirror", "beta", splits={"test": 6})
    with pytest.raises(ClusterInputError, match=r"mirror folder holding the datasets \['alpha', 'beta'\]"):
        load_images(tmp_path / "mirror", progress=False)


def test_parquet_without_image_column_is_an_error(tmp_path):
    import datasets

    path = tmp_path / "numbers" / "test.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_dict({"x": [1, 2, 3]}).to_parquet(str(path))
    with pytest.raises(ClusterInputError, match=r"no image column among \['x'\]"):
        load_images(path.parent, progress=False)


def test_choose_split_order():
    assert choose_split(["train", "test"], None, "x") == "test"
    assert choose_split(["train", "validation"], None, "x") == "train"
    assert choose_split(["unlabeled"], None, "x") == "unlabeled"
    with pytest.raises(ClusterInputError, match="choose one with --split"):
        choose_split(["a", "b"], None, "x")


# ------------------------------------------------------------------------------------------------ hub

def test_hub_id_offline_fails_with_one_clear_line():
    with pytest.raises(ClusterInputError) as info:
        load_images("someorg/not-a-local-folder", progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert "someorg/not-a-local-folder is not a local path and the Hugging Face hub could not load it" in message
    assert "HF_HUB_OFFLINE" in message


def test_input_names_are_file_safe(tmp_path):
    assert input_name("org/data.set") == "org__data.set"
    assert input_name(tmp_path / "my images") == "my_images"
    write_parquet_split(tmp_path / "one.parquet", [Image.new("L", (4, 4))], np.zeros(1), ["a"])
    assert input_name(tmp_path / "one.parquet") == "one"


# ------------------------------------------------------------------------------------------------ sheet

class _Page(HTMLParser):
    """Sections, images (src, title, size) and every attribute value of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict] = []
        self.tags: list[str] = []
        self.attribute_values: list[str] = []
        self._section: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attribute_values.extend(v for v in attrs.values() if v)
        if tag == "section" and attrs.get("class") == "cluster":
            self._section = attrs["id"]
            self.sections.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs | {"section": self._section})


def _sheet(tmp_path, per_cluster=2):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(9, 28, 28), dtype=np.uint8)
    labels = np.array([0, 0, 0, 0, 0, 2, 2, 2, 0])  # cluster 1 is empty
    confidence = np.array([0.9, 0.2, 0.5, 0.99, 0.1, 0.7, 0.8, 0.6, 0.3])
    names = [f"img_{i}.png" if i != 3 else WEIRD_NAME for i in range(9)]
    summary = {"checkpoint": "/x/ckpt.pt", "checkpoint_sha256": "ab" * 32, "n_clusters": 3, "num_steps": 4,
               "counts": {"images": 9, "skipped": 1}, "skipped": [{"file": "bad.png", "reason": "OSError: truncated"}],
               "ignored": ["notes.txt"], "clusters": []}
    path = write_contact_sheet(tmp_path / "out" / "clusters.html", images, labels, confidence, title="Test <sheet>",
                               summary=summary, per_cluster=per_cluster, names=names, n_clusters=3)
    return path, images, confidence, names


def test_contact_sheet_has_one_section_per_cluster_with_embedded_thumbnails(tmp_path):
    path, images, confidence, names = _sheet(tmp_path)
    page_text = path.read_text()
    page = _Page()
    page.feed(page_text)
    assert page.sections == ["cluster-0", "cluster-1", "cluster-2"]
    assert "http" not in page_text.lower() and "script" not in page.tags and "//" not in "".join(
        v for v in page.attribute_values if not v.startswith("data:"))
    assert page.images and all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    for img in page.images:
        thumb = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert thumb.size == (56, 56) and thumb.mode == "L"
    by_title = {img["title"]: img for img in page.images}
    weird = by_title[f"{WEIRD_NAME} (confidence 0.990)"]  # escaped in the page, the real name in the tooltip
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(weird["src"].split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded[::2, ::2], images[3])  # nearest-neighbour: every pixel a 2x2 block
    # cluster 0 has 6 members > 2 * per_cluster: its 2 most confident (3, 0) and 2 least confident (4, 1)
    shown = [img["alt"] for img in page.images if img["section"] == "cluster-0"]
    assert shown == [WEIRD_NAME, "img_0.png", "img_4.png", "img_1.png"]
    # cluster 2 has 3 members <= 2 * per_cluster: all of them, most confident first
    assert [img["alt"] for img in page.images if img["section"] == "cluster-2"] == ["img_6.png", "img_5.png",
                                                                                    "img_7.png"]
    assert "No image was assigned to this cluster" in page_text
    assert "bad.png: OSError: truncated" in page_text and "notes.txt" in page_text and "/x/ckpt.pt" in page_text
    assert "Test &lt;sheet&gt;" in page_text and "6 images (66.7%)" in page_text
    assert not list(path.parent.glob(".hmlib-tmp-*"))  # written atomically, no temp file left


def test_member_rows_and_bad_sheet_input(tmp_path):
    confidence = np.array([0.5, 0.5, 0.9])
    assert [list(rows) for _, rows in member_rows(confidence, np.array([0, 1, 2]), 5)] == [[2, 0, 1]]
    with pytest.raises(ValueError, match="must agree"):
        write_contact_sheet(tmp_path / "x.html", np.zeros((2, 28, 28), np.uint8), np.zeros(3, int), np.zeros(2),
                            title="t", summary={})
    with pytest.raises(ValueError, match="assignments must lie in 0..1"):
        write_contact_sheet(tmp_path / "x.html", np.zeros((2, 28, 28), np.uint8), np.array([0, 2]), np.zeros(2),
                            title="t", summary={}, n_clusters=2)
    assert not (tmp_path / "x.html").exists()
