"""`clipmatch eval --data` and `clipmatch fit-fusion --data`: the search judged and fitted on a user's own
labelled queries and gallery."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss")

from clipmatch.cli import main  # noqa: E402
from clipmatch.errors import DatasetError  # noqa: E402
from clipmatch.explain.explainers import KnowledgeBaseExplainer  # noqa: E402
from clipmatch.manifest import HeadsManifest  # noqa: E402
from clipmatch.retrieval.labelled import evaluate_labelled, open_gallery, read_labelled  # noqa: E402
from clipmatch.retrieval.search import Searcher  # noqa: E402

KB = {"Orrin pump": "a green star with purple checks", "Kestrel-7 valve": "a blue circle with yellow stripes"}


@pytest.fixture()
def labelled(tmp_path):
    """30 images, 12 queries naming 1-2 of them each (4 with an explanation, 2 of those by entity)."""
    rng = np.random.default_rng(3)
    (tmp_path / "photos").mkdir()
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i:02d}.png")
    lines = []
    for i in range(12):
        record = {"query": f"a red circle number {i} left of a blue square", "relevant": [f"photos/{i:02d}.png"]}
        if i % 3 == 0:
            record["relevant"].append(f"photos/{i + 12:02d}.png")
        if i in (1, 2):
            record["explanation"] = "a tall yellow triangle with black dots"
        if i in (4, 5):
            record["entity"] = "Orrin pump" if i == 4 else "Kestrel-7 valve"
        lines.append(json.dumps(record))
    (tmp_path / "labelled.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "kb.json").write_text(json.dumps(KB))
    return tmp_path


def test_eval_on_labelled_data_is_the_search_as_it_runs(local, labelled, tmp_path):
    queries = read_labelled(labelled / "labelled.jsonl", knowledge_base=KnowledgeBaseExplainer(labelled / "kb.json"))
    assert [q.group for q in queries].count("explained") == 4
    assert queries[4].explanation == KB["Orrin pump"] and queries[0].relevant[1].endswith("photos/12.png")
    index = open_gallery(local, labelled / "photos", queries, tmp_path / "work")
    assert len(index.paths) == 30
    searcher = Searcher(local, index)
    result = evaluate_labelled(searcher, queries, shortlist=20)
    # Each column, worked out here another way: the fused column is the search's own top hit,
    # the cosine column the query's own cosine over the whole gallery.
    for group in ("plain", "explained"):
        mine = [q for q in queries if q.group == group]
        top = [searcher.search(q.query, top_k=1, shortlist=20, explanation=q.explanation).hits[0].path
               for q in mine]
        fused_r1 = np.mean([str(p) in q.relevant for p, q in zip(top, mine)])
        assert result["groups"][group]["fused"]["r1"] == pytest.approx(fused_r1)
        cos = local.cosine(local.encode_images(index.paths), [q.query for q in mine])  # (N, Q)
        best = [index.paths[i] for i in cos.argmax(axis=0)]
        assert result["groups"][group]["cosine"]["r1"] == pytest.approx(np.mean([p in q.relevant
                                                                                 for p, q in zip(best, mine)]))
        assert result["groups"][group]["queries"] == len(mine)
    assert main(["eval", str(local.files.root), "--data", str(labelled / "labelled.jsonl"), "--gallery",
                 str(labelled / "photos"), "--kb", str(labelled / "kb.json"), "--shortlist", "20", "--json",
                 str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["groups"] == json.loads(json.dumps(result["groups"]))


def test_fit_fusion_on_labelled_data_writes_the_fit_into_the_model(model_copy, labelled, capsys):
    before = HeadsManifest.read(model_copy)
    assert main(["fit-fusion", str(model_copy), "--data", str(labelled / "labelled.jsonl"), "--gallery",
                 str(labelled / "photos"), "--kb", str(labelled / "kb.json"), "--dry-run"]) == 0
    assert "plain (8 labelled queries)" in capsys.readouterr().out
    assert HeadsManifest.read(model_copy) == before  # a dry run writes nothing
    assert main(["fit-fusion", str(model_copy), "--data", str(labelled / "labelled.jsonl"), "--gallery",
                 str(labelled / "photos"), "--kb", str(labelled / "kb.json")]) == 0
    fusion = HeadsManifest.read(model_copy).fusion
    assert fusion.fitted["split"] == "labelled data" and fusion.fitted["gallery"] == 30
    assert fusion.fitted["plain"]["queries"] == 8 and fusion.fitted["explained"]["queries"] == 4
    assert fusion.fitted["plain"]["sign_test"]["alpha"] == 0.01


@pytest.mark.parametrize("line,problem", [
    ("not json", "not JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"query": "", "relevant": ["a.png"]}', "'query' must be a non-empty string"),
    ('{"query": "a cat", "relevant": []}', "'relevant' must be a non-empty list"),
    ('{"query": "a cat", "relevant": ["a.png"], "colour": "red"}', r"unknown keys \['colour'\]"),
    ('{"query": "a cat", "relevant": ["a.png"], "explanation": "x", "entity": "Orrin pump"}', "not both"),
    ('{"query": "a cat", "relevant": ["a.png"], "entity": "Nobody"}', "'Nobody' is not in the knowledge base"),
])
def test_bad_lines_stop_with_file_line_and_problem(tmp_path, line, problem):
    path = tmp_path / "q.jsonl"
    path.write_text('{"query": "a dog", "relevant": ["b.png"]}\n' + line + "\n")
    with pytest.raises(DatasetError, match=rf"q\.jsonl:2: .*{problem}"):
        read_labelled(path, knowledge_base=KnowledgeBaseExplainer(KB))


def test_a_relevant_image_outside_the_gallery_is_named(local, labelled, tmp_path):
    queries = read_labelled(labelled / "labelled.jsonl", knowledge_base=KnowledgeBaseExplainer(labelled / "kb.json"))
    index = open_gallery(local, labelled / "photos", queries[:3], tmp_path / "work")
    (labelled / "other.jsonl").write_text(json.dumps({"query": "a cat", "relevant": ["elsewhere/x.png"]}) + "\n")
    from clipmatch.errors import InputError

    with pytest.raises(InputError, match=r"line 1: relevant images \[.*elsewhere/x.png'\] are not in the gallery"):
        evaluate_labelled(Searcher(local, index), read_labelled(labelled / "other.jsonl"))
