"""Data loading: folders, manifests, image decoding, buckets and crops. Every picture is drawn here."""

from __future__ import annotations

import codecs
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trainer import data
from trainer.config import DataConfig
from trainer.data import (
    DataError,
    Item,
    bucket_for,
    check_images,
    flip,
    load_items,
    make_buckets,
    open_image,
    prepare_image,
    read_manifest,
    scan_folder,
    write_manifest,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def draw(path: Path, size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = RED, **save) -> Path:
    Image.new("RGB", size, color).save(path, **save)
    return path


def quadrants(size: tuple[int, int]) -> Image.Image:
    """An asymmetric picture: red top-left, green top-right, blue bottom-left, white bottom-right."""
    w, h = size
    image = Image.new("RGB", size)
    pen = ImageDraw.Draw(image)
    pen.rectangle((0, 0, w // 2 - 1, h // 2 - 1), fill=RED)
    pen.rectangle((w // 2, 0, w - 1, h // 2 - 1), fill=GREEN)
    pen.rectangle((0, h // 2, w // 2 - 1, h - 1), fill=BLUE)
    pen.rectangle((w // 2, h // 2, w - 1, h - 1), fill=WHITE)
    return image


def near(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def names(items: list[Item]) -> list[str]:
    return [Path(item.image).name for item in items]


# ------------------------------------------------------------------------------------------------ folder


def test_folder_with_txt_captions(tmp_path: Path) -> None:
    draw(tmp_path / "b.jpg")
    draw(tmp_path / "a.png")
    draw(tmp_path / "C.WEBP")
    (tmp_path / "a.txt").write_text("  a red square\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("photo of b", encoding="utf-8")
    (tmp_path / "C.txt").write_text("shouting", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    draw(tmp_path / "sub" / "nested.png")

    items, warnings = scan_folder(tmp_path)

    assert names(items) == ["C.WEBP", "a.png", "b.jpg"]
    assert [item.caption for item in items] == ["shouting", "a red square", "photo of b"]
    assert all(Path(item.image).is_absolute() for item in items)
    assert warnings == [
        f"1 subfolder was not read (only pictures directly in the folder {tmp_path.name}): sub/ (1 picture)"
    ]


def test_metadata_jsonl_picks_columns_by_name(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    draw(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("ignored when metadata exists", encoding="utf-8")
    rows = [
        {"text": "caption for b", "score": 3, "file_name": "b.png"},
        {"text": "caption for a", "score": 9, "file_name": "a.png"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")

    items, _ = scan_folder(tmp_path)

    assert [(Path(i.image).name, i.caption) for i in items] == [
        ("a.png", "caption for a"),
        ("b.png", "caption for b"),
    ]


def test_metadata_jsonl_falls_back_to_the_only_text_column(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    row = {"width": 32, "alt_text_en": "a red square", "image": "a.png"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")

    items, _ = scan_folder(tmp_path)

    assert items[0].caption == "a red square"


def test_metadata_with_two_unnamed_text_columns_is_ambiguous(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    row = {"file_name": "a.png", "alt_en": "red", "alt_fr": "rouge"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row), encoding="utf-8")

    with pytest.raises(DataError, match="alt_en, alt_fr"):
        scan_folder(tmp_path)


def test_metadata_csv(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    draw(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text(
        'Caption,file_name\n"red, square",a.png\nanother,b.png\n', encoding="utf-8-sig"
    )

    items, _ = scan_folder(tmp_path)

    assert [i.caption for i in items] == ["red, square", "another"]


def test_metadata_rows_naming_missing_files_are_errors(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    rows = [{"file_name": "a.png", "text": "ok"}, {"file_name": "gone.png", "text": "x"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")

    with pytest.raises(DataError, match="gone.png"):
        scan_folder(tmp_path)


def test_missing_captions_are_counted_in_one_warning(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        draw(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("only a has one", encoding="utf-8")

    items, warnings = scan_folder(tmp_path)

    assert [i.caption for i in items] == ["only a has one", "", ""]
    assert len(warnings) == 1 and "2 of 3" in warnings[0]


def test_duplicate_stems_are_kept_with_a_warning(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    draw(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("shared", encoding="utf-8")

    items, warnings = scan_folder(tmp_path)

    assert names(items) == ["a.jpg", "a.png"]
    assert any("a.jpg" in w and "a.png" in w for w in warnings)


def test_empty_folder_error_names_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "empty_dataset"
    folder.mkdir()
    with pytest.raises(DataError, match="empty_dataset.*empty"):
        scan_folder(folder)


def test_folder_without_images_error_names_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "only_text"
    folder.mkdir()
    (folder / "a.txt").write_text("caption without an image", encoding="utf-8")
    with pytest.raises(DataError, match="only_text.*no images"):
        scan_folder(folder)


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02"  # what macOS writes as ._NAME


def test_hidden_and_system_files_are_skipped_with_one_warning(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    draw(tmp_path / "b.png", color=BLUE)
    (tmp_path / "a.txt").write_text("a red square", encoding="utf-8")
    (tmp_path / "._a.png").write_bytes(APPLE_DOUBLE)
    (tmp_path / "._a.txt").write_bytes(APPLE_DOUBLE)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "DESKTOP.INI").write_text("[.ShellClassInfo]\n", encoding="utf-8")

    items, warnings = scan_folder(tmp_path)
    check_images(items)  # the real pictures open: nothing here is "not an image"

    assert names(items) == ["a.png", "b.png"]
    assert [i.caption for i in items] == ["a red square", ""]
    skipped = [w for w in warnings if "hidden or system" in w]
    assert skipped == ["skipped 5 hidden or system files (.DS_Store, ._a.png, ._a.txt and 2 more)"]
    trained, trainer_warnings = load_items(DataConfig(folder=str(tmp_path)))
    assert names(trained) == ["a.png", "b.png"] and skipped[0] in trainer_warnings


def test_one_skipped_file_is_named_in_the_warning(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")

    _, warnings = scan_folder(tmp_path)

    assert warnings == ["skipped 1 hidden or system file (Thumbs.db)", *warnings[1:]]


def test_folder_of_only_hidden_files_says_it_has_no_images(tmp_path: Path) -> None:
    folder = tmp_path / "copied_from_a_mac"
    folder.mkdir()
    (folder / "._a.png").write_bytes(APPLE_DOUBLE)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    with pytest.raises(DataError, match=r"copied_from_a_mac: no images \(only hidden or system files: "
                                        r"\.DS_Store, \._a\.png\)"):
        scan_folder(folder)


CAPTION = "café au lait, 猫 🐱"


@pytest.mark.parametrize(
    "encoded",
    [
        CAPTION.encode("utf-16"),  # with a BOM, as Windows Notepad's "Unicode" saves
        codecs.BOM_UTF16_LE + CAPTION.encode("utf-16-le"),
        codecs.BOM_UTF16_BE + CAPTION.encode("utf-16-be"),
        CAPTION.encode("utf-8-sig"),
    ],
    ids=["utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-8-bom"],
)
def test_captions_with_a_bom_read_as_plain_utf8(tmp_path: Path, encoded: bytes) -> None:
    draw(tmp_path / "plain.png")
    draw(tmp_path / "saved.png")
    (tmp_path / "plain.txt").write_text(CAPTION + "\n", encoding="utf-8")
    (tmp_path / "saved.txt").write_bytes(encoded)

    items, _ = scan_folder(tmp_path)

    assert [i.caption for i in items] == [CAPTION, CAPTION]


def test_captions_in_other_encodings_are_refused_naming_every_file(tmp_path: Path) -> None:
    for name in ("ansi", "bomless", "fine"):
        draw(tmp_path / f"{name}.png")
    (tmp_path / "ansi.txt").write_bytes("café".encode("cp1252"))  # b"caf\xe9": not UTF-8
    (tmp_path / "bomless.txt").write_bytes("a cat".encode("utf-16-le"))  # UTF-16 without its BOM
    (tmp_path / "fine.txt").write_text("café", encoding="utf-8")

    with pytest.raises(DataError) as caught:
        scan_folder(tmp_path)

    problems = caught.value.problems
    assert len(problems) == 2
    assert str(tmp_path / "ansi.txt") in problems[0] and "not UTF-8 or UTF-16" in problems[0]
    assert str(tmp_path / "bomless.txt") in problems[1] and "not UTF-8 or UTF-16" in problems[1]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-8"])
def test_metadata_jsonl_in_utf16_or_utf8_is_read(tmp_path: Path, encoding: str) -> None:
    draw(tmp_path / "a.png")
    row = {"file_name": "a.png", "text": CAPTION}
    (tmp_path / "metadata.jsonl").write_bytes((json.dumps(row, ensure_ascii=False) + "\n").encode(encoding))

    items, _ = scan_folder(tmp_path)

    assert [i.caption for i in items] == [CAPTION]


def test_metadata_csv_in_utf16_is_read(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes(f'file_name,text\na.png,"{CAPTION}"\n'.encode("utf-16"))

    items, _ = scan_folder(tmp_path)

    assert [i.caption for i in items] == [CAPTION]


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.csv"])
def test_metadata_in_another_encoding_is_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    draw(tmp_path / "a.png")
    text = '{"file_name": "a.png", "text": "café"}\n' if name.endswith("jsonl") else "file_name,text\na.png,café\n"
    (tmp_path / name).write_bytes(text.encode("cp1252"))

    with pytest.raises(DataError) as caught:
        scan_folder(tmp_path)

    (problem,) = caught.value.problems
    assert str(tmp_path / name) in problem and "not UTF-8 or UTF-16" in problem


# -------------------------------------------------------------------------------- subfolders, bad metadata


def test_pictures_in_subfolders_are_not_read_but_named_in_one_warning(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    (folder / "hands" / "left").mkdir(parents=True)
    (folder / "extra").mkdir()
    (folder / "notes").mkdir()  # no pictures: not worth a word
    draw(folder / "a.png")
    draw(folder / "b.png")
    for name in ("1.png", "2.jpg"):
        draw(folder / "hands" / name)
    draw(folder / "hands" / "left" / "3.png")  # counted: the count looks into nested folders
    draw(folder / "extra" / "4.png")
    (folder / "notes" / "todo.txt").write_text("caption more", encoding="utf-8")
    (folder / "a.txt").write_text("a", encoding="utf-8")
    (folder / "b.txt").write_text("b", encoding="utf-8")

    items, warnings = scan_folder(folder)

    assert names(items) == ["a.png", "b.png"]
    expected = ("2 subfolders were not read (only pictures directly in the folder train): "
                "hands/ (3 pictures), extra/ (1 picture)")
    assert warnings == [expected]
    assert expected in load_items(DataConfig(folder=str(folder)))[1]


def test_many_subfolders_are_named_a_few_then_counted(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    for name in ("p", "q", "r", "s", "t"):
        (tmp_path / name).mkdir()
        draw(tmp_path / name / "x.png")

    _, warnings = scan_folder(tmp_path)

    assert [w for w in warnings if "subfolders" in w] == [
        f"5 subfolders were not read (only pictures directly in the folder {tmp_path.name}): "
        "p/ (1 picture), q/ (1 picture), r/ (1 picture) and 2 more"
    ]


def test_hidden_subfolders_are_not_named(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    for hidden in (".ipynb_checkpoints", ".thumbnails", "__MACOSX", "poses"):
        (tmp_path / hidden).mkdir()
    draw(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    draw(tmp_path / ".thumbnails" / "a.png")
    (tmp_path / "__MACOSX" / "._a.png").write_bytes(APPLE_DOUBLE)  # what a zip made on a Mac leaves
    draw(tmp_path / "poses" / "b.png")
    (tmp_path / "poses" / ".hidden").mkdir()
    draw(tmp_path / "poses" / ".hidden" / "c.png")  # not counted either

    _, warnings = scan_folder(tmp_path)

    assert warnings == [
        f"1 subfolder was not read (only pictures directly in the folder {tmp_path.name}): poses/ (1 picture)"
    ]


def test_a_folder_whose_pictures_are_all_in_subfolders_says_where_they_are(tmp_path: Path) -> None:
    folder = tmp_path / "kohya_style"
    (folder / "10_person").mkdir(parents=True)
    draw(folder / "10_person" / "a.png")

    with pytest.raises(DataError) as caught:
        scan_folder(folder)

    assert caught.value.problems[-1] == ("1 subfolder was not read (only pictures directly in the folder "
                                         "kohya_style): 10_person/ (1 picture)")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bad_metadata(tmp_path: Path) -> list[str]:
    with pytest.raises(DataError) as caught:
        scan_folder(tmp_path)
    return caught.value.problems


def test_one_error_names_every_bad_metadata_line_of_every_kind(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    metadata = write_lines(tmp_path / "metadata.jsonl", [
        json.dumps({"file_name": "a.png", "text": "fine"}),
        '{"file_name": "b.png", "text": "no closing brace"',
        '["a.png", "a list, not an object"]',
        "",
        json.dumps({"file_name": "gone.png", "text": "names a missing file"}),
    ])

    problems = bad_metadata(tmp_path)

    assert [p.split(": ")[1] for p in problems] == ["line 2", "line 3", "line 5"]
    assert all(p.startswith(f"{metadata}: ") for p in problems)
    assert "not valid JSON" in problems[0] and "expected an object" in problems[1] and "gone.png" in problems[2]


def test_rows_are_numbered_by_their_line_in_the_file(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    draw(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    draw(tmp_path / "sub" / "c.png")
    write_lines(tmp_path / "metadata.jsonl", [
        "not json",
        "",
        json.dumps({"file_name": "a.png", "text": "line 3"}),
        json.dumps({"file_name": "a.png", "text": "again"}),
        json.dumps({"text": "no file name"}),
        json.dumps({"file_name": "b.png", "text": ["not", "text"]}),
        json.dumps({"file_name": "sub/c.png", "text": "in a subfolder"}),
        json.dumps({"file_name": "b.png", "text": "a caption with a line separator\u2028in it"},
                   ensure_ascii=False),
    ])

    problems = bad_metadata(tmp_path)

    assert [p.split(": ", 2)[1:] for p in problems] == [
        ["line 1", "not valid JSON (Expecting value)"],
        ["line 4", "'a.png': listed again (first on line 3)"],
        ["line 5", "no file name in column 'file_name'"],
        ["line 6", "'b.png': caption is not text (['not', 'text'])"],
        ["line 7", "'sub/c.png': not an image directly in the folder (subfolders are not scanned)"],
    ]


def test_a_file_of_many_bad_lines_lists_the_first_twenty(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    rows = [json.dumps({"file_name": "a.png", "text": "fine"})] + [f"bad {n}" for n in range(50)]
    metadata = write_lines(tmp_path / "metadata.jsonl", rows)

    problems = bad_metadata(tmp_path)

    assert [p.split(": ")[1] for p in problems[:-1]] == [f"line {n}" for n in range(2, 22)]
    assert problems[-1] == f"{metadata}: and 30 more bad lines"


def test_a_csv_lists_every_bad_row_by_the_line_it_starts_on(tmp_path: Path) -> None:
    draw(tmp_path / "a.png")
    draw(tmp_path / "b.png")
    draw(tmp_path / "c.png")
    (tmp_path / "metadata.csv").write_text(
        "file_name,text\n"
        '"a.png","a caption\nover two lines"\n'  # lines 2-3
        "b.png,red, square\n"  # line 4: an unquoted comma makes a third value
        '"gone.png","also\ntwo lines"\n'  # lines 5-6
        ",no file name\n"  # line 7
        f'c.png,"{"x" * 200_000}"\n',  # line 8: over the csv module's field limit
        encoding="utf-8",
    )

    problems = bad_metadata(tmp_path)

    assert [p.split(": ", 2)[1] for p in problems] == ["line 4", "line 5", "line 7", "line 8"]
    assert "3 values for 2 columns" in problems[0] and "gone.png" in problems[1]


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_round_trip_keeps_emoji_and_cjk(tmp_path: Path) -> None:
    items = [
        Item(str(tmp_path / "a.png"), "猫が座っている 🐱✨"),
        Item(str(tmp_path / "b.png"), '한국어 캡션, emoji 👍🏽 and "quotes"\nnew line'),
    ]
    path = tmp_path / "manifest.json"

    write_manifest(items, path)

    assert read_manifest(path) == items
    assert "猫" in path.read_text(encoding="utf-8")  # readable, not \u-escaped


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"format": "something-else", "version": 1, "items": []}, "not a LoRA Foundry manifest"),
        ({"format": "lora-foundry-manifest", "version": 2, "items": []}, "unsupported manifest version 2"),
        ({"format": "lora-foundry-manifest", "version": 1, "items": [{"image": "/x.png"}]}, "'caption'"),
        (
            {"format": "lora-foundry-manifest", "version": 1, "items": [{"image": "x.png", "caption": ""}]},
            "absolute",
        ),
        ({"format": "lora-foundry-manifest", "version": 1, "items": []}, "no images"),
    ],
)
def test_bad_manifests_name_the_problem(tmp_path: Path, document: dict, problem: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(DataError, match=problem):
        read_manifest(path)


def test_load_items_applies_top_rows(tmp_path: Path) -> None:
    for name in ("d", "a", "c", "b"):
        draw(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")

    items, warnings = load_items(DataConfig(folder=str(tmp_path), top_rows=2))
    assert names(items) == ["a.png", "b.png"]
    assert any("1 of 2" in w for w in warnings)  # the caption count covers only the images used

    manifest = tmp_path / "manifest.json"
    write_manifest([Item(str(tmp_path / f"{n}.png"), n) for n in "abcd"], manifest)
    items, _ = load_items(DataConfig(manifest=str(manifest), top_rows=3))
    assert [i.caption for i in items] == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------------ images


def test_unreadable_files_are_reported_together(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    good = draw(tmp_path / "good.jpg", (256, 256), quality=95)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    noisy.save(tmp_path / "full.jpg", quality=95)
    full = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "notes.png").write_text("I am text, not a picture", encoding="utf-8")
    items = [Item(str(tmp_path / n), "") for n in ("zero.png", "truncated.jpg", "notes.png")]

    with pytest.raises(DataError) as caught:
        check_images([Item(str(good), ""), *items])

    problems = caught.value.problems
    assert len(problems) == 3
    assert "zero.png" in problems[0] and "empty" in problems[0]
    assert "truncated.jpg" in problems[1] and "truncated" in problems[1]
    assert "notes.png" in problems[2] and "not an image" in problems[2]
    assert all(name in str(caught.value) for name in ("zero.png", "truncated.jpg", "notes.png"))


def test_tiny_image_is_rejected(tmp_path: Path) -> None:
    path = draw(tmp_path / "dot.png", (1, 1))
    with pytest.raises(DataError, match="dot.png.*too small"):
        check_images([Item(str(path), "")])


def test_exif_rotated_jpeg_comes_out_upright(tmp_path: Path) -> None:
    upright = quadrants((64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes(), quality=95)

    loaded = open_image(path)

    assert loaded.size == (64, 32)
    for x, y in ((8, 8), (56, 8), (8, 24), (56, 24)):
        assert near(loaded.getpixel((x, y)), upright.getpixel((x, y)))


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red ink
    image = open_image(path)
    assert image.mode == "RGB" and near(image.getpixel((8, 8)), RED)


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:, 8:] = 32768  # mid grey in 16 bits
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)

    image = open_image(path)

    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == (0, 0, 0)
    assert near(image.getpixel((12, 2)), (128, 128, 128), tolerance=1)


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([*RED, *GREEN] + [0] * 762)
    ImageDraw.Draw(image).rectangle((8, 0, 15, 15), fill=1)
    path = tmp_path / "sticker.png"
    image.save(path, transparency=0)  # red is the transparent index

    loaded = open_image(path)

    assert loaded.mode == "RGB"
    assert loaded.getpixel((2, 2)) == WHITE
    assert loaded.getpixel((12, 2)) == GREEN


def test_rgba_is_composited_over_white_and_grayscale_becomes_rgb(tmp_path: Path) -> None:
    Image.new("RGBA", (16, 16), (0, 0, 0, 128)).save(tmp_path / "half.png")
    Image.new("L", (16, 16), 100).save(tmp_path / "grey.png")

    assert near(open_image(tmp_path / "half.png").getpixel((4, 4)), (127, 127, 127), tolerance=2)
    grey = open_image(tmp_path / "grey.png")
    assert grey.mode == "RGB" and grey.getpixel((4, 4)) == (100, 100, 100)


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = draw(tmp_path / "huge.png", (200, 200))
    monkeypatch.setattr(data, "MAX_PIXELS", 100 * 100)
    with pytest.raises(DataError, match="huge.png.*too large"):
        open_image(path)

    # Pillow's own hard limit (a smaller global set by someone else) reads the same way
    monkeypatch.setattr(data, "MAX_PIXELS", 10**8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)
    with pytest.raises(DataError, match="huge.png.*too large"):
        open_image(path)


@pytest.mark.parametrize("height, refused", [(10000, False), (10001, True)])
def test_the_size_limit_is_100_megapixels_read_from_the_header(tmp_path: Path, height: int, refused: bool) -> None:
    path = tmp_path / "big.png"
    Image.new("1", (10000, height)).save(path)  # 1 bit a pixel: 12.5 MB to draw, a few KB on disk
    if refused:
        with pytest.raises(DataError, match="big.png: too large .10000x10001 = 100.0 MP; at most 100 MP"):
            check_images([Item(image=str(path), caption="")])
    else:
        check_images([Item(image=str(path), caption="")])


# ----------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(("resolution", "step"), [(512, 64), (768, 64), (1024, 64), (512, 32)])
def test_buckets_are_step_multiples_within_the_area(resolution: int, step: int) -> None:
    buckets = make_buckets(resolution, step, max_aspect=2.0)

    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert max(w, h) / min(w, h) <= 2.0
        # as close to the area as the step allows: one more step on the long side overflows
        assert (max(w, h) + step) * min(w, h) > resolution * resolution
    assert {(h, w) for w, h in buckets} == set(buckets)
    assert any(w > h for w, h in buckets) and any(h > w for w, h in buckets)


def test_square_bucket_is_exact_when_resolution_is_not_a_step_multiple() -> None:
    buckets = make_buckets(520, 64)
    assert (520, 520) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets if (w, h) != (520, 520))


def test_bucket_for_keeps_orientation() -> None:
    cfg = DataConfig(resolution=512)
    w, h = bucket_for(512, 768, cfg)
    assert h > w and w * h <= 512 * 512 and w <= 512 and h <= 768
    w, h = bucket_for(1920, 1080, cfg)
    assert w > h and w * h <= 512 * 512
    assert bucket_for(1000, 1000, cfg) == (512, 512)


def test_bucket_for_never_upscales() -> None:
    cfg = DataConfig(resolution=768)
    assert bucket_for(64, 64, cfg) == (64, 64)
    for size in ((300, 200), (200, 300), (1000, 300), (517, 333)):
        w, h = bucket_for(*size, cfg)
        assert w <= size[0] and h <= size[1] and w % 8 == 0 and h % 8 == 0
        assert (w > h) == (size[0] > size[1])


def test_without_bucketing_every_image_gets_the_square() -> None:
    cfg = DataConfig(resolution=512, bucketing=False)
    assert bucket_for(64, 64, cfg) == (512, 512)
    assert bucket_for(512, 1024, cfg) == (512, 512)


# ------------------------------------------------------------------------------------------------ pixels


def gradient(size: tuple[int, int]) -> Image.Image:
    """Every column a different colour, so any horizontal shift of a crop is visible."""
    w, h = size
    row = np.linspace(0, 255, w, dtype=np.float64)
    pixels = np.stack([np.tile(row, (h, 1)), np.tile(row[::-1], (h, 1)), np.full((h, w), 80.0)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("bucket", [(64, 64), (96, 48), (40, 80)])
def test_prepare_image_fills_the_bucket_in_range(bucket: tuple[int, int]) -> None:
    tensor = prepare_image(quadrants((200, 120)), bucket, "center", None)

    assert tensor.shape == (3, bucket[1], bucket[0]) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert tensor.max() - tensor.min() > 1.0  # the picture survived, not a flat fill


def test_prepare_image_maps_black_and_white_to_the_range_ends() -> None:
    image = Image.new("RGB", (32, 32), WHITE)
    ImageDraw.Draw(image).rectangle((0, 0, 15, 31), fill=(0, 0, 0))
    tensor = prepare_image(image, (32, 32), "center", None)
    assert tensor[:, :, 0].eq(-1.0).all() and tensor[:, :, -1].eq(1.0).all()


def test_random_crop_is_deterministic_per_seed() -> None:
    image = gradient((512, 128))  # covers a 64x64 bucket at 256x64: 192 px of horizontal freedom

    first = prepare_image(image, (64, 64), "random", random.Random(1))
    again = prepare_image(image, (64, 64), "random", random.Random(1))
    others = [prepare_image(image, (64, 64), "random", random.Random(seed)) for seed in range(2, 6)]

    assert torch.equal(first, again)
    assert any(not torch.allclose(first, other) for other in others)


def test_center_crop_is_centered() -> None:
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((140, 0, 159, 99), fill=WHITE)  # a band exactly in the middle

    tensor = prepare_image(image, (64, 64), "center", None)

    assert torch.allclose(tensor, flip(tensor), atol=1e-5)  # mirror-symmetric: the band is centered
    assert tensor[:, :, 32].min() > 0.9 and tensor[:, :, 0].max() < -0.9


def test_flip_mirrors_left_and_right() -> None:
    tensor = prepare_image(quadrants((64, 64)), (64, 64), "center", None)
    flipped = flip(tensor)
    assert torch.equal(flipped[:, :, 0], tensor[:, :, -1])
    assert torch.equal(flip(flipped), tensor)


def test_random_crop_without_rng_is_refused() -> None:
    with pytest.raises(ValueError, match="rng"):
        prepare_image(gradient((128, 64)), (64, 64), "random", None)
