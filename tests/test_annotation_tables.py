"""Annotation tables under misuse: a row is one line (a quote that is never closed, a value over several
lines, a repeated column or key are refused with the file and the line), a video is its file whatever the
spelling (dataset, split, train/test overlap), captions of one video need not be next to each other, an
earlier split is not replaced silently, and scripts/custom.sh does not choose between two files."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dataloaders import build_test_dataset, build_train_dataset
from dataloaders.base import AnnotationError
from dataloaders.custom import files_in_both, parse_rows, read_annotation_rows
from preprocess.split_annotations import main as split_main, read_rows
from tests.test_custom_data import REPO, args_for, direct_ranks, media, write_rows  # noqa: F401 (fixture)

STRAY_QUOTE = 'video,caption\nv0.mp4,a red square\nv1.mp4,"a blue circle\nv2.mp4,a green triangle\n'


# ------------------------------------------------------------------------------------ one row, one line
UNREADABLE = [  # (file name, text, message): each refused, naming the file and the line
    ("stray quote", "a.csv", STRAY_QUOTE, "a.csv line 3: a quote \" opened in this row is never closed"),
    ("quote closed lines later", "a.csv",
     'video,caption\nv0.mp4,"a red\nsquare"\nv1.mp4,a blue circle\n', "a.csv line 2: a value runs over lines 2-3"),
    ("stray quote, tsv", "a.tsv", 'video\tcaption\nv0.mp4\ta red square\nv1.mp4\t"a blue circle\nv2.mp4\tgreen\n',
     "a.tsv line 3: a quote \" opened in this row is never closed"),
    ("quote inside a quoted value", "a.csv", 'video,caption\nv0.mp4,"a "red" square"\n',
     "a.csv line 2: misplaced quote"),
    ("column named twice", "a.csv", "video,caption,caption\nv0.mp4,one,two\n",
     "a.csv line 1: column 'caption' named twice"),
    ("column named twice, spaces", "a.tsv", "video\tcaption\t video \nv0.mp4\tone\tv1.mp4\n",
     "a.tsv line 1: column 'video' named twice"),
    ("header again", "a.csv", "video,caption\nv0.mp4,one\nvideo,caption\nv1.mp4,two\n",
     "a.csv line 3: the header again"),
    ("header again, with a byte order mark", "a.csv", "video,caption\nv0.mp4,one\n\ufeffvideo,caption\nv1.mp4,two\n",
     "a.csv line 3: the header again"),
    ("value under no column", "a.csv", "video,caption,\nv0.mp4,one,two\n",
     "a.csv line 2: a value in column 3, which the header (line 1) does not name"),
    ("json key twice", "a.jsonl", '{"video": "v0.mp4", "caption": "one"}\n{"video": "v1.mp4", "caption": "two", '
     '"caption": "three"}\n', "a.jsonl line 2: key 'caption' given twice"),
    ("json list of captions", "a.jsonl", '{"video": "v0.mp4", "caption": ["one", "two"]}\n',
     "a.jsonl line 1 key 'caption': a JSON list"),
    ("json object over lines", "a.jsonl", '{"video": "v0.mp4",\n "caption": "one"}\n', "a.jsonl line 1: not a JSON"),
    ("utf-16 without a byte order mark", "a.csv", None, "a.csv line 1: a NUL character"),
    ("a value over the csv module's limit", "a.csv", "video,caption\nv0.mp4," + "word " * 30000 + "\n",
     "a.csv line 2: a value longer than 131072 characters"),
    ("tabs in a .csv", "a.csv", "video\tcaption\nv0.mp4\tone\n", "tab-separated? name the file .tsv"),
    ("commas in a .tsv", "a.tsv", "video,caption\nv0.mp4,one\n", "comma-separated? name the file .csv"),
    ("semicolons", "a.csv", "video;caption\nv0.mp4;one\n", "separated by semicolons?"),
    ("json NaN as a caption", "a.jsonl", '{"video": "v0.mp4", "caption": NaN}\n',
     "a.jsonl line 1: NaN is not a value"),
    ("json Infinity as an end", "a.jsonl", '{"video": "v0.mp4", "caption": "one", "start": 0, "end": Infinity}\n',
     "a.jsonl line 1: Infinity is not a value"),
    ("json true as a caption", "a.jsonl", '{"video": "v0.mp4", "caption": true}\n',
     "a.jsonl line 1 key 'caption': a JSON true"),
]


def _write(path, text):
    if text is None:
        path.write_bytes("video,caption\nv0.mp4,one\n".encode("utf-16-le"))
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return str(path)


@pytest.mark.parametrize("name,filename,text,message", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_a_row_is_one_line_or_the_file_is_refused(tmp_path, name, filename, text, message):
    path = _write(tmp_path / filename, text)
    with pytest.raises(AnnotationError) as exc:
        parse_rows(path, ("video",))
    assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_a_stray_quote_stops_every_reader_of_tables(media, tmp_path, capsys):
    """The training dataset, the split (nothing written), the labelled queries and the QB-norm bank."""
    from retrieval.evaluate import read_bank, read_queries
    from retrieval.model_io import SearchError

    path = _write(tmp_path / "a.csv", STRAY_QUOTE)
    for build in (build_test_dataset, build_train_dataset):
        with pytest.raises(AnnotationError, match="a.csv line 3: a quote"):
            build(args_for(media, path, path), None)
    assert split_main([path, "--out_dir", str(tmp_path / "s")]) == 2
    assert "a.csv line 3: a quote" in capsys.readouterr().err and not (tmp_path / "s").exists()
    queries = _write(tmp_path / "q.csv", STRAY_QUOTE.replace("caption", "query"))
    with pytest.raises(SearchError, match="q.csv line 3: a quote"):
        read_queries(queries, str(media))
    with pytest.raises(SearchError, match="--qb_norm .*a.csv line 3: a quote"):
        read_bank(path)


def test_a_stray_quote_ends_main_py_in_one_line(media, tmp_path):
    from preprocess.make_tiny_clip import write_tiny_clip

    clip = write_tiny_clip(["a red square", "a blue circle"], str(tmp_path / "clip"), num_merges=10)
    path = _write(tmp_path / "test.csv", STRAY_QUOTE)
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--datatype", "custom", "--do_eval", "1",
                           "--val_csv", path, "--features_path", str(media), "--output_dir", str(tmp_path / "o"),
                           "--pretrained_dir", str(tmp_path / "clip"), "--pretrained_clip_name", "tiny-clip.pt",
                           "--bpe_path", clip["bpe"], "--device", "cpu", "--cpu_tuning", "0", "--max_frames", "4",
                           "--max_words", "16", "--unified_transformer_layers", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("main.py: error: ") and "test.csv line 3: a quote" in last
    assert not (tmp_path / "o" / "results.json").exists()


def test_quoted_values_are_read_and_lines_counted(tmp_path):
    """What is not refused: a quoted comma, a doubled quote, blank lines, Windows line ends."""
    text = 'video,caption\n\nv0.mp4,"red, then blue"\nv1.mp4,"a ""quoted"" word"\r\n\nv2.mp4,plain\n'
    _, _, rows = parse_rows(_write(tmp_path / "a.csv", text), ("video",))
    assert [(n, r["caption"]) for n, _, r in rows] == [(3, "red, then blue"), (4, 'a "quoted" word'), (6, "plain")]


MISSPELT = [  # a column the reader would ignore, silently reading the rows without it
    ("Start, End", "a.csv", "video,caption,Start,End\nv0.mp4,one,0,4\n", "a.csv line 1 column 'Start'", "start"),
    ("video-id", "a.jsonl", '{"video": "v0.mp4", "caption": "one"}\n{"video": "v0.mp4", "caption": "two", '
     '"video-id": "k"}\n', "a.jsonl line 2 key 'video-id'", "video_id"),
    ("strat", "a.tsv", "video\tcaption\tstrat\tend\nv0.mp4\tone\t0\t4\n", "a.tsv line 1 column 'strat'", "start"),
]


@pytest.mark.parametrize("name,filename,text,where,meant", MISSPELT, ids=[m[0] for m in MISSPELT])
def test_a_misspelt_column_is_refused(media, tmp_path, name, filename, text, where, meant):
    path = _write(tmp_path / filename, text)
    with pytest.raises(AnnotationError) as exc:
        build_test_dataset(args_for(media, path), None)
    assert f"{where}: not a column this reads" in str(exc.value) and f"'{meant}' is" in str(exc.value)


def test_other_columns_and_keys_are_kept_out_of_the_way(media, tmp_path):
    csv_path = _write(tmp_path / "a.csv", "video,caption,source,notes\na.mp4,one,web,fine\n")
    jsonl = _write(tmp_path / "a.jsonl", '{"video": "a.mp4", "caption": "one", "tags": ["x", "y"], "ok": true}\n')
    for path in (csv_path, jsonl):
        assert build_test_dataset(args_for(media, path), None).captions == ["one"]


@pytest.mark.parametrize("text,message", [
    ("video,caption\na.mp4,nan\n", "a.csv line 2 column 'caption': 'nan' is a missing value written out"),
    ("video,caption\nNone,a yellow screen\n", "a.csv line 2 column 'video': 'None' is a missing value"),
    ("video,caption,order_twin\na.mp4,left then up,NaN\n", "a.csv line 2 column 'order_twin': 'NaN' is a missing"),
    ("video,caption,group\na.mp4,left then up,null\n", "a.csv line 2 column 'group': 'null' is a missing"),
])
def test_missing_values_written_out_as_text_are_refused(media, tmp_path, text, message):
    with pytest.raises(AnnotationError, match=message):
        build_test_dataset(args_for(media, _write(tmp_path / "a.csv", text)), None)


def test_numbers_with_underscores_are_not_seconds(media, tmp_path):
    path = _write(tmp_path / "a.csv", "video,caption,start,end\nlong/c.mp4,one,1_0,12\n")  # float() reads 10
    with pytest.raises(AnnotationError, match="a.csv line 2 column 'start': '1_0' is not a number"):
        build_test_dataset(args_for(media, path), None)


# ------------------------------------------------------------------------------------ one file, one video
def test_every_spelling_of_a_file_is_one_video(media, tmp_path):
    """Relative, ./relative, absolute and a link to the file: one video, its captions linked to it even
    when they are not next to each other in the table."""
    os.symlink(media / "a.mp4", tmp_path / "link_to_a.mp4")
    rows = [("a.mp4", "first of a", "", ""),
            ("b.mp4", "first of b", "", ""),
            ("./a.mp4", "second of a", "", ""),
            (str(media / "a.mp4"), "third of a", "", ""),
            ("long/../b.mp4", "second of b", "", ""),
            (str(tmp_path / "link_to_a.mp4"), "fourth of a", "", ""),
            ("./long/c.mp4", "red at first", "0", "4.0"),
            (str(media / "long" / "c.mp4"), "red again", "0", "4"),
            ("long/c.mp4", "green", "4", "8")]
    path = write_rows(tmp_path / "ann.csv", rows)
    ds = build_test_dataset(args_for(media, path), None)
    assert [v.video_id for v in ds.videos] == ["a.mp4", "b.mp4", "./long/c.mp4@0-4", "long/c.mp4@4-8"]
    truth = [0, 1, 0, 0, 1, 0, 2, 2, 3]  # from the table, by hand
    assert ds.caption_video_index.tolist() == truth
    assert [ds.videos[v].path for v in truth[:2]] == [str(media / "a.mp4"), str(media / "b.mp4")]
    train = build_train_dataset(args_for(media, None, path, expand_msrvtt_sentences=False), None)
    assert len(train) == 4  # one sample per video, not per spelling
    # an exact repeat under another spelling is a repeat
    again = write_rows(tmp_path / "again.csv", rows + [(str(media / "b.mp4"), "first of b", "", "")])
    assert build_test_dataset(args_for(media, again), None).num_captions == 9


def test_a_video_id_is_one_file_whatever_the_spelling(media, tmp_path):
    rows = [("a.mp4", "one", "x"), (str(media / "a.mp4"), "two", "x"), ("b.mp4", "three", "x")]
    ok = write_rows(tmp_path / "ok.csv", rows[:2], ("video", "caption", "video_id"))
    assert build_test_dataset(args_for(media, ok), None).caption_video_index.tolist() == [0, 0]
    bad = write_rows(tmp_path / "bad.csv", rows, ("video", "caption", "video_id"))
    with pytest.raises(AnnotationError, match="bad.csv line 4 column 'video': video_id 'x' is already another"):
        build_test_dataset(args_for(media, bad), None)


def test_train_test_overlap_counts_files_whatever_the_spelling(media, tmp_path):
    os.symlink(media / "b.mp4", tmp_path / "link_to_b.mp4")
    train = write_rows(tmp_path / "train.csv", [(str(media / "a.mp4"), "a", "", ""), ("./long/c.mp4", "c", "0", "4"),
                                                (str(tmp_path / "link_to_b.mp4"), "b", "", "")])
    test = write_rows(tmp_path / "test.csv", [("a.mp4", "a", "", ""), ("b.mp4", "b", "", ""),
                                              ("long/c.mp4", "c", "4", "8")])
    shared = files_in_both(read_annotation_rows(train, str(media)), read_annotation_rows(test, str(media)))
    assert shared == [os.path.realpath(media / name) for name in ("a.mp4", "b.mp4", "long/c.mp4")]


def test_interleaved_captions_are_scored_against_their_own_video(media, tmp_path):
    """Each caption's ground truth is the video its row names, checked through training.evaluation.evaluate
    against ranks computed by hand from the table (not from the dataset's own links)."""
    from modules.tokenizer import get_tokenizer, write_bpe_vocab
    from tests.toy import evaluate_moved_tiny_dgl

    rows = [("a.mp4", "a yellow screen", "", ""), ("b.mp4", "a cyan screen", "", ""),
            ("long/c.mp4", "red at first", "0", "4"), ("./a.mp4", "yellow all the time", "", ""),
            (str(media / "b.mp4"), "cyan all the time", "", ""), ("long/c.mp4", "then green", "4", "8"),
            ("long/c.mp4", "still red", "0", "4"), ("a.mp4", "yellow again", "", "")]
    files = ["a.mp4", "b.mp4", "long/c.mp4@0-4", "long/c.mp4@4-8"]
    truth = [0, 1, 2, 0, 1, 3, 2, 0]  # the video of each row, by hand
    bpe = write_bpe_vocab([r[1] for r in rows], tmp_path / "bpe.txt.gz", num_merges=40)
    tok = get_tokenizer(bpe_path=bpe)
    ds = build_test_dataset(args_for(media, write_rows(tmp_path / "ann.csv", rows)), tok)
    assert [v.video_id for v in ds.videos] == files
    res = evaluate_moved_tiny_dgl(ds, tok.vocab_size)
    assert res["sim"].shape == (8, 4)
    t2v, v2t = direct_ranks(res["sim"], truth, 4)
    assert (res["ranks"]["t2v"] + 1).tolist() == t2v.tolist()
    assert (res["ranks"]["v2t"] + 1).tolist() == v2t.tolist()


# ------------------------------------------------------------------------------------ the split
def test_split_keeps_every_spelling_of_a_file_on_one_side(tmp_path, capsys):
    root = tmp_path / "videos"
    root.mkdir()
    rows = []
    for i in range(6):
        spellings = [f"v{i}.mp4", f"./v{i}.mp4", str(root / f"v{i}.mp4"), f"sub/../v{i}.mp4"]
        rows += [(spellings[(i + k) % 4], f"caption {k} of {i}", "", "") for k in range(4)]
    ann = write_rows(tmp_path / "all.csv", rows)
    for seed in range(4):
        out = tmp_path / f"s{seed}"
        assert split_main([ann, "--out_dir", str(out), "--video_root", str(root), "--seed", str(seed),
                           "--test_fraction", "0.5"]) == 0
        assert "train: 3 video files, 12 rows" in capsys.readouterr().out
        names = [{os.path.basename(r[2]) for r in read_rows(str(out / f"{side}.csv"), str(root))[2]}
                 for side in ("train", "test")]
        assert not names[0] & names[1] and len(names[0]) == len(names[1]) == 3


def test_split_keeps_each_group_on_one_side(tmp_path, capsys):
    """A clip and its order-swapped twin (two files, one group) never land on both sides."""
    root = tmp_path / "videos"
    root.mkdir()
    lines = ["video,caption,group"]
    for g in range(10):
        lines += [f"c{g}a.mp4,left then up {g},g{g}", f"c{g}b.mp4,up then left {g},g{g}"]
    lines += ["lone.mp4,a clip of its own,"]
    ann = _write(tmp_path / "all.csv", "\n".join(lines) + "\n")
    for seed in range(4):
        out = tmp_path / f"s{seed}"
        assert split_main([ann, "--out_dir", str(out), "--video_root", str(root), "--seed", str(seed),
                           "--test_fraction", "0.5"]) == 0
        capsys.readouterr()
        sides = [{r[3] for r in read_rows(str(out / f"{side}.csv"), str(root))[2] if r[3]}
                 for side in ("train", "test")]
        assert sides[0] and sides[1] and not sides[0] & sides[1], sides
        files = sum(len(read_rows(str(out / f"{side}.csv"), str(root))[2]) for side in ("train", "test"))
        assert files == 21


@pytest.mark.parametrize("text,message", [
    ("video,caption\na.mp4,one\nb.mp4,\n", "t.csv line 3 column 'caption': empty value"),
    ("video,caption,start,end\na.mp4,one,4,2\nb.mp4,two,,\n", "t.csv line 2 column 'start': 4 is not before end 2"),
    ("video,caption,video_id\na.mp4,one,x\nb.mp4,two,x\n", "t.csv line 3 column 'video': video_id 'x' is already"),
    ("video,caption,Start,End\na.mp4,one,0,4\nb.mp4,two,0,4\n", "t.csv line 1 column 'Start'"),
])
def test_split_refuses_what_training_refuses(tmp_path, capsys, text, message):
    path = _write(tmp_path / "t.csv", text)
    assert split_main([path, "--out_dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s").exists()


def test_an_earlier_split_is_replaced_only_on_request(tmp_path, capsys):
    rows = [(f"v{i}.mp4", f"caption {i}", "", "") for i in range(8)]
    ann = write_rows(tmp_path / "all.csv", rows)
    out = tmp_path / "split"
    assert split_main([ann, "--out_dir", str(out), "--seed", "0"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert split_main([ann, "--out_dir", str(out), "--seed", "0"]) == 0  # a rerun: the same split
    assert "nothing written" in capsys.readouterr().out
    assert split_main([ann, "--out_dir", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds another split" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert split_main([ann, "--out_dir", str(out), "--seed", "1", "--overwrite"]) == 0
    assert (out / "test.csv").read_bytes() != first["test.csv"]
    # a split in another format there would leave scripts/custom.sh two files to choose from
    jsonl = tmp_path / "all.jsonl"
    jsonl.write_text("".join(f'{{"video": "v{i}.mp4", "caption": "c"}}\n' for i in range(8)), encoding="utf-8")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert split_main([str(jsonl), "--out_dir", str(out), "--overwrite"]) == 2
    assert "already holds a split in another format" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert split_main([ann, "--out_dir", str(out / "train.csv")]) == 2
    assert "--out_dir " + str(out / "train.csv") + " is a file, not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ scripts/custom.sh
@pytest.mark.parametrize("files,message", [
    (("train.csv", "train.jsonl", "test.csv"), "holds 2 train files"),
    (("train.csv", "test.tsv", "test.csv"), "holds 2 test files"),
])
def test_custom_sh_refuses_two_annotation_files_of_one_split(tmp_path, files, message):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "ViT-B-32.pt").write_bytes(b"")
    for name in files:
        (tmp_path / name).write_text("video,caption\nv.mp4,c\n")
    env = {k: v for k, v in os.environ.items() if k not in ("VIDEO_PATH", "DGL_PRETRAINED_DIR")}
    env.update(DATA_PATH=str(tmp_path), PRETRAINED_DIR=str(tmp_path / "clip"), OUTPUT_DIR=str(tmp_path / "o"))
    r = subprocess.run(["bash", str(REPO / "scripts" / "custom.sh")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ make_custom_example
def test_make_custom_example_does_not_write_over_another_collection(tmp_path, capsys):
    from preprocess.make_custom_example import main as make_main

    out = tmp_path / "example"
    assert make_main([str(out), "--num_short", "2", "--num_long", "0"]) == 0
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert make_main([str(out), "--num_short", "2", "--num_long", "0"]) == 0  # a rerun: the same collection
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
    capsys.readouterr()
    assert make_main([str(out), "--num_short", "2", "--num_long", "0", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "annotations.csv differs" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
    # fewer clips than an earlier run: its extra videos would stay, and be indexed with the rest
    assert make_main([str(out), "--num_short", "1", "--num_long", "0"]) == 2
    assert "differs" in capsys.readouterr().err
    for name in ("annotations.csv", "queries.csv", "vocabulary.txt"):
        (out / name).unlink()
    assert make_main([str(out), "--num_short", "1", "--num_long", "0"]) == 2
    err = capsys.readouterr().err
    assert "videos this collection does not write" in err and "clip_001.mp4" in err
    assert not (out / "annotations.csv").exists()
