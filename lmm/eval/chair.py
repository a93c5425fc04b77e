"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"): how many of the
objects a caption mentions are not in the image.

* **CHAIR_i** = hallucinated object mentions / all object mentions, over the whole set
  (each mention counts, a repeated word as often as it occurs);
* **CHAIR_s** = captions with at least one hallucinated mention / captions;
* **recall** = objects of the image the caption mentions (each once) / objects of the image,
  summed over the captions before dividing (as the common Python 3 port,
  Maxlinn/CHAIR-metric-standalone, reports it).

Object mentions are found through a synonym table, one line per object category, comma +
space separated, the first entry naming the category (the reference's ``synonyms.txt``,
``"dog, puppy, pup"``). A caption is lower-cased and split into words (runs of letters); each
word that is the plural of a word of the table becomes that word (plurals are made by English
rules plus irregular forms: person/people or persons, man/men, knife/knives, sheep/sheep...); then table
entries are matched left to right, longest first (``"hot dog"`` before ``"dog"``, ``"teddy
bears"`` as ``"teddy bear"``), each match consuming its words. Every match is one mention of
its category.

How this differs from the reference (LisaAnne/Hallucination ``utils/chair.py``), which uses
nltk's tokenizer and pattern.en's ``singularize`` (neither is an lmm dependency):

* words are runs of letters, so ``"teddy-bear"`` is two words and ``"dog's"`` is ``dog s``;
* only plurals of the table's own words are singularised (those are the only words that
  can matter), by the rules above rather than pattern's;
* every multi-word entry of the table is matched (the reference merges a fixed list of word
  pairs); entries are stripped, so the file's ``"motorcycle, scooter,  motor bike"`` makes
  ``"motor bike"`` a motorcycle (the reference's double space makes it match nothing).

With ``coco_rules`` (what ``python -m lmm score chair`` uses for COCO) the reference's extra
phrases apply too: ``baby``/``adult`` + an animal is that animal, ``passenger jet`` a jet,
``passenger train`` a train, ``toilet seat`` a toilet, ``bow tie`` a tie, ``home plate`` and
``train track`` are no object, and ``seat`` is no chair in a caption that says ``toilet``.

Ground truth for COCO (as the reference builds it): the categories of the image's
``instances`` annotations plus every category mentioned by its reference ``captions``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

from lmm.errors import AnnotationError
from lmm.eval.predictions import (
    PredictionSet,
    match_predictions,
    read_json_or_jsonl,
    report_counts,
)

__all__ = [
    "ChairAnnotations",
    "SynonymTable",
    "chair_metrics",
    "evaluate",
    "load_annotations",
    "plurals",
    "read_predictions",
    "read_synonyms",
]

_WORD = re.compile(r"[a-z]+")

# Irregular plurals of words that occur in object vocabularies (COCO's synonym table among them).
_IRREGULAR = {
    "person": "people",
    "child": "children",
    "grandchild": "grandchildren",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "mouse": "mice",
    "ox": "oxen",
    "knife": "knives",
    "pocketknife": "pocketknives",
    "wife": "wives",
    "calf": "calves",
    "half": "halves",
    "leaf": "leaves",
    "loaf": "loaves",
    "shelf": "shelves",
    "wolf": "wolves",
    "potato": "potatoes",
    "tomato": "tomatoes",
}
_SAME_PLURAL = {
    "sheep",
    "deer",
    "fish",
    "bison",
    "buffalo",
    "cattle",
    "moose",
    "aircraft",
    "series",
}

# The reference's caption_to_words extras (COCO only): phrases that name another object, or none.
_COCO_ANIMALS = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
)
COCO_EXTRA_PHRASES: dict[str, str | None] = {
    **{f"{age} {animal}": animal for age in ("baby", "adult") for animal in _COCO_ANIMALS},
    "passenger jet": "jet",
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",
    "home plate": None,
    "train track": None,
}


def _regular_plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def plurals(word: str) -> tuple[str, ...]:
    """Plural forms of a single word: the irregular one (``people``, ``men``, ``knives``) when
    there is one, and the regular one (``persons``, ``buses``, ``ladies``), which writers use
    too for some of them; ``sheep`` and the like only as themselves."""
    if word in _SAME_PLURAL:
        return (word,)
    irregular = _IRREGULAR.get(word)
    if irregular is None and word.endswith("man") and word != "human":
        irregular = word[:-3] + "men"  # policeman, gentleman, woman
    regular = _regular_plural(word)
    return (irregular, regular) if irregular else (regular,)


@dataclass
class SynonymTable:
    """Object categories and the words/phrases that name them.

    Args:
        node_of: Table entry (lower-case words joined by one space) -> category ("node word").
        extra: Phrases that name another entry (``"baby dog"`` -> ``"dog"``) or no object (None).
        seat_rule: Drop ``seat`` mentions from captions that say ``toilet`` (COCO's rule).
    """

    node_of: dict[str, str]
    extra: dict[str, str | None] = field(default_factory=dict)
    seat_rule: bool = False

    def __post_init__(self) -> None:
        phrases = list(self.node_of) + list(self.extra)
        vocab = {w for p in phrases for w in p.split()}
        # A word of the table is never read as the plural of another ("bus" is no plural of "bu").
        self._singular = {p: w for w in vocab for p in plurals(w) if p not in vocab}
        self._longest = max((len(p.split()) for p in phrases), default=1)

    @classmethod
    def from_groups(
        cls, groups: Iterable[Sequence[str]], coco_rules: bool = False
    ) -> "SynonymTable":
        """From lists of entries, each list's first entry naming the category (a later list
        wins for an entry listed twice, as in the reference)."""
        node_of: dict[str, str] = {}
        for group in groups:
            entries = [" ".join(_WORD.findall(e.lower())) for e in group]
            entries = [e for e in entries if e]
            for entry in entries:
                node_of[entry] = entries[0]
        if not node_of:
            raise AnnotationError("the synonym table has no entries")
        return cls(node_of, dict(COCO_EXTRA_PHRASES) if coco_rules else {}, seat_rule=coco_rules)

    @property
    def categories(self) -> set[str]:
        return set(self.node_of.values())

    def node(self, entry: str) -> str | None:
        """The category an entry names (singular or plural), or None."""
        words = [self._singular.get(w, w) for w in _WORD.findall(entry.lower())]
        return self.node_of.get(" ".join(words))

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """``(matched words, category)`` per object mention, in caption order, repeats kept."""
        words = [self._singular.get(w, w) for w in _WORD.findall(caption.lower())]
        found: list[tuple[str, str]] = []
        i = 0
        while i < len(words):
            for n in range(min(self._longest, len(words) - i), 0, -1):
                phrase = " ".join(words[i : i + n])
                if phrase in self.extra or phrase in self.node_of:
                    target = self.extra[phrase] if phrase in self.extra else phrase
                    node = self.node_of.get(target) if target is not None else None
                    if node is not None:
                        found.append((target, node))
                    i += n
                    break
            else:
                i += 1
        if self.seat_rule and any(w == "toilet" for w, _ in found):
            found = [(w, n) for w, n in found if w != "seat"]
        return found


def read_synonyms(path: str | Path, coco_rules: bool = True) -> SynonymTable:
    """A synonym file: one category per line, ``"category, synonym, synonym"``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AnnotationError(
            f"cannot read the synonym file {path}: {exc.strerror or exc}"
        ) from None
    groups = [line.split(",") for line in lines if line.strip()]
    if not groups:
        raise AnnotationError(f"{path}: no synonym lines ('category, synonym, ...' per line)")
    return SynonymTable.from_groups(groups, coco_rules=coco_rules)


def chair_metrics(
    captions: Sequence[str], truths: Sequence[Collection[str]], table: SynonymTable
) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i and recall of ``captions[i]`` against the categories ``truths[i]``.

    Also returns ``n`` (captions), ``mentions``, ``hallucinated_mentions``,
    ``hallucinated_captions`` and the most often hallucinated categories."""
    if len(captions) != len(truths):
        raise ValueError(f"chair_metrics: {len(captions)} captions but {len(truths)} truths")
    mentions = hallucinated = bad_captions = recalled = truth_total = 0
    counts: Counter[str] = Counter()
    for caption, truth in zip(captions, truths):
        truth = set(truth)
        nodes = [node for _, node in table.mentions(caption)]
        wrong = [n for n in nodes if n not in truth]
        mentions += len(nodes)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        counts.update(wrong)
        recalled += len(truth & set(nodes))
        truth_total += len(truth)
    n = len(captions)
    return {
        "chair_s": bad_captions / n if n else 0.0,
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "recall": recalled / truth_total if truth_total else 0.0,
        "n": n,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "hallucinated_captions": bad_captions,
        "hallucinated_objects": dict(counts.most_common(10)),
    }


# -- files: `python -m lmm score chair` ------------------------------------------------------------


def _image_key(value: Any) -> str:
    """COCO image ids are integers; ``17`` and ``"17"`` name the same image."""
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


@dataclass
class ChairAnnotations:
    """Ground-truth categories per image and the synonym table."""

    truth: dict[str, set[str]]
    table: SynonymTable
    source: str = ""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc.msg})") from None


def _coco_truth(files: list[Path], table: SynonymTable) -> dict[str, set[str]]:
    truth: dict[str, set[str]] = {}
    for path in files:
        doc = _read_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
            raise AnnotationError(f"{path}: expected a COCO annotation file with 'annotations'")
        if "categories" in doc:  # instances_*.json
            names = {c["id"]: c["name"] for c in doc["categories"]}
            nodes = {}
            for cid, name in names.items():
                nodes[cid] = table.node(name)
                if nodes[cid] is None:
                    raise AnnotationError(
                        f"{path}: COCO category {name!r} is not in the synonym table; "
                        "use the synonym file written for COCO's categories"
                    )
            for ann in doc["annotations"]:
                truth.setdefault(_image_key(ann["image_id"]), set()).add(nodes[ann["category_id"]])
        else:  # captions_*.json
            for ann in doc["annotations"]:
                found = {node for _, node in table.mentions(str(ann.get("caption", "")))}
                truth.setdefault(_image_key(ann["image_id"]), set()).update(found)
    return truth


def load_annotations(path: str | Path, synonyms: str | Path | None = None) -> ChairAnnotations:
    """Ground truth for CHAIR from ``path``:

    * a directory holding COCO's ``instances_*.json`` and/or ``captions_*.json`` (e.g. the
      2014 train and val files; all are read), or one such file; needs ``synonyms``;
    * any other JSON / JSON lines file of ``{"image_id", "objects": [words]}`` records: the
      objects of each image, named by entries of the synonym table, or, without ``synonyms``,
      each distinct word its own category.
    """
    path = Path(path)
    coco = sorted(path.glob("instances_*.json")) + sorted(path.glob("captions_*.json"))
    if path.is_dir() and not coco:
        raise AnnotationError(
            f"{path}: no COCO instances_*.json or captions_*.json in this directory"
        )
    if path.is_file() and path.name.startswith(("instances_", "captions_")):
        coco = [path]
    table = read_synonyms(synonyms, coco_rules=bool(coco)) if synonyms is not None else None
    if coco:
        if table is None:
            raise AnnotationError(
                f"{path}: COCO ground truth needs the synonym table (--synonyms synonyms.txt)"
            )
        return ChairAnnotations(_coco_truth(coco, table), table, str(path))
    doc = read_json_or_jsonl(path)
    records = doc if isinstance(doc, list) else [doc]
    words: dict[str, list[str]] = {}
    for i, rec in enumerate(records, start=1):
        if (
            not isinstance(rec, dict)
            or "image_id" not in rec
            or not isinstance(rec.get("objects"), list)
        ):
            raise AnnotationError(f"{path}: record {i} needs 'image_id' and an 'objects' list")
        words[_image_key(rec["image_id"])] = [str(w) for w in rec["objects"]]
    if table is None:
        table = SynonymTable.from_groups([[w] for ws in words.values() for w in ws])
    truth = {}
    for image, ws in words.items():
        nodes = {table.node(w) for w in ws}
        if None in nodes:
            unknown = [w for w in ws if table.node(w) is None]
            raise AnnotationError(
                f"{path}: image {image}: objects {unknown} are not in the synonym table"
            )
        truth[image] = nodes
    return ChairAnnotations(truth, table, str(path))


def _caption_record(obj: Any) -> dict[str, Any] | str:
    """A caption record as ``{"question_id": image, "text": caption}``, or why not."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    image = obj.get("image_id", obj.get("question_id"))
    text = obj.get("caption", obj.get("text"))
    if image is None or isinstance(image, (dict, list, bool)):
        return "no 'image_id' (or 'question_id')"
    if not isinstance(text, str):
        return "no string 'caption' (or 'text')"
    return {**obj, "question_id": _image_key(image), "text": text}


def read_predictions(path: str | Path) -> PredictionSet:
    """Generated captions: JSON lines / a JSON list of ``{"image_id", "caption"}`` (or lmm's
    ``{"question_id", "text"}`` answer records, ``question_id`` = the image id), or the
    coco-caption evaluation file the reference reads (``{"imgToEval": {id: {"image_id",
    "caption"}}}``)."""
    path = Path(path)
    out = PredictionSet(source=str(path))
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
        items = (
            list(doc["imgToEval"].values()) if isinstance(doc, dict) and "imgToEval" in doc else doc
        )
        items = items if isinstance(items, list) else [items]
        lines = list(enumerate(items, start=1))
    except json.JSONDecodeError:
        lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                out.malformed.append((number, f"bad JSON ({exc.msg})"))
    for number, obj in lines:
        rec = _caption_record(obj)
        if isinstance(rec, str):
            out.malformed.append((number, rec))
        else:
            out.records.append(rec)
    return out


def evaluate(ann: ChairAnnotations, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """CHAIR of caption records (``question_id`` = image id, ``text`` = caption) whose image
    has ground truth; captions of other images are counted in ``unknown``."""
    match = match_predictions(
        records,
        lambda rec: (
            _image_key(rec["question_id"]) if _image_key(rec["question_id"]) in ann.truth else None
        ),
    )
    images = list(match.by_key)
    out = chair_metrics(
        [match.by_key[i]["text"] for i in images], [ann.truth[i] for i in images], ann.table
    )
    out.update(report_counts([], match))
    return out
