"""Choosing compositions from the music21 corpus and reading their labels.

The music21 wheel ships a corpus of real, human-labelled music; the labels used here are the
ones its encoders wrote, never guesses:

* O'Neill's *Music of Ireland* (1850) and Ryan's *Mammoth Collection* (1883) as ABC: the
  ``R:`` field names the dance type (reel, jig, hornpipe, slip jig, strathspey, clog, air,
  highland fling).
* The Essen folk song collection as ABC: the ``O:`` field names where a song was collected;
  the file it sits in says whether it is a ballad or a children's song.
* Bach's four-part chorales, Palestrina's mass movements (Humdrum) and Monteverdi's madrigals
  (MusicXML): the collection is the genre and names the composer.

Selection (:func:`select_pieces`) only reads text, so it is fast and runs in the parent
process; :func:`analyse_piece` parses one score with music21 (the slow part, run in workers)
and returns its notes in quarter lengths plus key, mode, metre and note density.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "COLLECTIONS",
    "Note",
    "Piece",
    "PieceRef",
    "analyse_piece",
    "corpus_root",
    "dance_type",
    "parse_abc_header",
    "select_pieces",
    "split_abc_tunes",
]

# ------------------------------------------------------------------------------- references


@attrs.frozen
class PieceRef:
    """Where one composition lives and the labels read from its header.

    Attributes:
        id: Stable identifier (``collection-file-number``), also the split group.
        collection: Key of :data:`COLLECTIONS`.
        path: File path relative to the music21 corpus folder.
        abc: The tune's ABC text (file preamble + the tune) for ABC sources; ``None`` for
            files that music21 parses whole.
        labels: Tags read from the header (``genre``, ``region``, ``composer``) and extra
            fields (``title``, ``licence``).
    """

    id: str
    collection: str
    path: str
    abc: str | None
    labels: dict[str, Any]


@attrs.frozen
class Note:
    """A note of a score in quarter lengths (tempo-free), as the renderer needs it."""

    onset: float
    duration: float
    pitch: int
    velocity: int


@attrs.frozen
class Piece:
    """An analysed composition: its notes and the labels music21 derives from the score."""

    ref: PieceRef
    notes: tuple[Note, ...]
    length_ql: float
    beat_ql: float
    metre: str
    tonic: str
    mode: str
    key_source: str
    polyphonic: bool
    notes_per_beat: float
    title: str
    licence: str


def corpus_root() -> Path:
    """The ``corpus`` folder inside the installed music21 package (no download involved)."""
    import importlib.util

    spec = importlib.util.find_spec("music21")
    if spec is None or spec.origin is None:
        raise ImportError("music21 is not installed; `pip install music21` (the demo corpus reads its scores)")
    return Path(spec.origin).parent / "corpus"


# ------------------------------------------------------------------------------ ABC reading

_DANCES = {
    "reel": "reel",
    "hornpipe": "hornpipe",
    "jig": "jig",
    "double jig": "jig",
    "slipjig": "slip jig",
    "slip jig": "slip jig",
    "strathspey": "strathspey",
    "clog": "clog",
    "air": "air",
    "highland fling": "highland fling",
    "fling": "highland fling",
}
"""O'Neill's ``R:`` spellings → one name per dance type (a double jig is a jig in 6/8)."""


def dance_type(rhythm: str | None) -> str | None:
    """Normalise an ABC ``R:`` field to a dance type, or ``None`` when it names none we use."""
    if not rhythm:
        return None
    text = re.sub(r"\s+", " ", rhythm.strip().lower().rstrip("]").strip())
    return _DANCES.get(text)


def split_abc_tunes(text: str) -> tuple[str, list[str]]:
    """Split an ABC file into its preamble (lines before the first ``X:``) and its tunes.

    Each tune is parsed on its own with the preamble prepended, so selecting 100 tunes out of a
    700-tune file does not pay for parsing the other 600.
    """
    parts = re.split(r"(?m)^(?=X:)", text)
    preamble = parts[0] if parts and not parts[0].startswith("X:") else ""
    tunes = [p for p in parts if p.startswith("X:")]
    return preamble, tunes


def parse_abc_header(tune: str) -> dict[str, str]:
    """The header fields of one ABC tune (``X T R O M L K N Z ...``), first value of each,
    up to and including the ``K:`` line that ends the header."""
    fields: dict[str, str] = {}
    for line in tune.splitlines():
        match = re.match(r"^([A-Za-z]):\s*(.*)$", line)
        if not match:
            continue
        key, value = match.group(1), match.group(2).strip()
        fields.setdefault(key, value)
        if key == "K":
            break
    return fields


_REGIONS = {
    "deutschland": "Germany",
    "luxemburg": "Luxembourg",
    "lothringen": "Lorraine",
    "irland": "Ireland",
    "china": "China",
    "oesterreich": "Austria",
    "niederlande": "Netherlands",
    "schweiz": "Switzerland",
    "jugoslawien": "Yugoslavia",
    "polen": "Poland",
    "frankreich": "France",
}


def essen_region(origin: str | None) -> str | None:
    """The country an Essen song was collected in, from its ``O:`` field.

    The field is a path from continent to place (``Europa, Mitteleuropa, Deutschland,
    Westfalen``); the first component that names a country is the region tag.
    """
    if not origin:
        return None
    for part in re.split(r"[,;/]", origin):
        region = _REGIONS.get(part.strip().lower())
        if region:
            return region
    return None


# ------------------------------------------------------------------------------ collections

_ESSEN_LICENCE = (
    "Essen Folksong Collection (EsAC), ABC encoding by Seymour Shlien; permission for "
    "non-commercial distribution and use in music21 (music21/corpus/essenFolksong/license.txt)"
)
_MUSIC21_LICENCE = (
    "music21 corpus encoding; may restrict commercial use (music21/corpus/license.txt)"
)

COLLECTIONS: dict[str, dict[str, Any]] = {
    "oneills": {
        "title": "O'Neill's Music of Ireland (1850)",
        "folder": "oneills1850",
        "region": "Ireland",
        "licence": "public-domain source (O'Neill, 1850); ABC transcription distributed with music21",
        # per dance type: how many tunes at most (the rarer types are taken whole)
        "caps": {"reel": 90, "jig": 90, "hornpipe": 70, "slip jig": 60, "air": 40},
    },
    "ryans": {
        # A Boston collection of fiddle tunes of many origins: no single region to claim.
        "title": "Ryan's Mammoth Collection (1883)",
        "folder": "ryansMammoth",
        "licence": "public-domain source (Ryan, 1883); ABC transcription distributed with music21",
        "caps": {"reel": 60, "jig": 60, "hornpipe": 60, "strathspey": 50, "clog": 40,
                 "highland fling": 20, "slip jig": 20},
    },
    "essen": {
        "title": "Essen Folksong Collection",
        # file stem prefix -> (genre, how many songs at most)
        "files": {"han": ("folk song", 80), "lux": ("folk song", 60), "lot": ("folk song", 60),
                  "erk": ("folk song", 60), "irl": ("folk song", 40), "ballad": ("ballad", 60),
                  "kinder": ("children's song", 50)},
    },
    "bach": {"title": "J. S. Bach, four-part chorales", "genre": "chorale", "composer": "J. S. Bach",
             "region": "Germany", "cap": 150},
    "palestrina": {"title": "Palestrina, mass movements", "genre": "mass", "composer": "Palestrina",
                   "region": "Italy", "cap": 100},
    "monteverdi": {"title": "Monteverdi, madrigals", "genre": "madrigal", "composer": "Monteverdi",
                   "region": "Italy", "cap": 30},
}
"""The collections of the demo corpus and how much of each is used. The caps balance genres:
O'Neill's has ~650 reels but ~20 flings, and a corpus of mostly reels teaches little."""


def _take(items: list, cap: int, seed: int, salt: str) -> list:
    """A deterministic sample of at most ``cap`` items (order as in the input)."""
    if len(items) <= cap:
        return list(items)
    rng = random.Random(_stable_int(f"{seed}:{salt}"))
    keep = set(rng.sample(range(len(items)), cap))
    return [item for i, item in enumerate(items) if i in keep]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _dance_tunes(root: Path, name: str, spec: dict, seed: int, scale: float) -> list[PieceRef]:
    """Tunes of an ABC dance-tune collection whose ``R:`` names a dance type we keep."""
    by_type: dict[str, list[PieceRef]] = {}
    for path in sorted((root / spec["folder"]).glob("*.abc")):
        preamble, tunes = split_abc_tunes(path.read_text(encoding="latin-1"))
        for tune in tunes:
            head = parse_abc_header(tune)
            genre = dance_type(head.get("R"))
            if genre is None or genre not in spec["caps"]:
                continue
            number = head.get("X", "0").strip()
            labels = {
                "genre": genre,
                "title": head.get("T", ""),
                "licence": spec["licence"]
                + (f"; {head['Z'].strip(chr(34))}" if head.get("Z", "").strip('"') else ""),
            }
            if spec.get("region"):
                labels["region"] = spec["region"]
            ref = PieceRef(
                id=f"{name}-{path.stem}-{number}",
                collection=name,
                path=f"{spec['folder']}/{path.name}",
                abc=preamble + tune,
                labels=labels,
            )
            by_type.setdefault(genre, []).append(ref)
    out: list[PieceRef] = []
    for genre, cap in spec["caps"].items():
        out += _take(by_type.get(genre, []), max(1, round(cap * scale)), seed, f"{name}:{genre}")
    return out


def _essen(root: Path, spec: dict, seed: int, scale: float) -> list[PieceRef]:
    out: list[PieceRef] = []
    for prefix, (genre, cap) in spec["files"].items():
        refs = []
        for path in sorted((root / "essenFolksong").glob(f"{prefix}*.abc")):
            preamble, tunes = split_abc_tunes(path.read_text(encoding="latin-1"))
            for tune in tunes:
                head = parse_abc_header(tune)
                region = essen_region(head.get("O"))
                if region is None:
                    continue
                number = head.get("X", "0").strip()
                refs.append(
                    PieceRef(
                        id=f"essen-{path.stem}-{number}",
                        collection="essen",
                        path=f"essenFolksong/{path.name}",
                        abc=preamble + tune,
                        labels={"genre": genre, "region": region, "title": head.get("T", ""),
                                "licence": _ESSEN_LICENCE},
                    )
                )
        out += _take(refs, max(1, round(cap * scale)), seed, f"essen:{prefix}")
    return out


def _files(root: Path, name: str, spec: dict, pattern: str, seed: int, scale: float) -> list[PieceRef]:
    paths = sorted(root.glob(pattern))
    refs = [
        PieceRef(
            id=f"{name}-{p.stem}",
            collection=name,
            path=str(p.relative_to(root)),
            abc=None,
            labels={"genre": spec["genre"], "region": spec["region"], "composer": spec["composer"],
                    "title": "", "licence": _MUSIC21_LICENCE},
        )
        for p in paths
    ]
    return _take(refs, max(1, round(spec["cap"] * scale)), seed, name)


def select_pieces(*, seed: int, scale: float = 1.0) -> list[PieceRef]:
    """Every composition the demo corpus renders, in a fixed order.

    Args:
        seed: Picks which pieces fill each collection's cap.
        scale: Multiplies every cap (a small build for tests uses e.g. 0.1).
    """
    root = corpus_root()
    refs = _dance_tunes(root, "oneills", COLLECTIONS["oneills"], seed, scale)
    refs += _dance_tunes(root, "ryans", COLLECTIONS["ryans"], seed, scale)
    refs += _essen(root, COLLECTIONS["essen"], seed, scale)
    refs += _files(root, "bach", COLLECTIONS["bach"], "bach/bwv*.mxl", seed, scale)
    refs += _files(root, "palestrina", COLLECTIONS["palestrina"], "palestrina/*.krn", seed, scale)
    refs += _files(root, "monteverdi", COLLECTIONS["monteverdi"], "monteverdi/madrigal.*.mxl", seed, scale)
    return refs


# --------------------------------------------------------------------------------- analysis


def _parse(ref: PieceRef):
    """The music21 score of ``ref``, read without the steps that only serve notation.

    * ABC: music21's ABC import ends with ``Part.makeBeams``, which groups notes under beams
      for engraving and was two thirds of the parse time; beams change no pitch, onset,
      duration or tie, so it is switched off for the parse (:func:`_without_beaming`).
    * Files (MusicXML, Humdrum) are parsed from source without reading or writing music21's
      pickle cache (``/tmp/music21``): on a fresh machine the cache is empty and writing it
      costs time for nothing, and reading it would make a build depend on what ran before.
    """
    from music21 import converter

    if ref.abc is not None:
        with _without_beaming():
            return converter.parse(ref.abc, format="abc")
    return converter.parse(str(corpus_root() / ref.path), forceSource=True, storePickle=False)


@contextlib.contextmanager
def _without_beaming():
    """Make ``Stream.makeBeams`` a no-op for the duration (restored afterwards)."""
    from music21 import stream

    original = stream.Stream.__dict__.get("makeBeams")
    if original is None:  # a music21 without it: nothing to skip
        yield
        return

    def no_beams(self, *, inPlace=False, **kwargs):
        return None if inPlace else self

    stream.Stream.makeBeams = no_beams
    try:
        yield
    finally:
        stream.Stream.makeBeams = original


def _key_of(score) -> tuple[str, str, str]:
    """Tonic, mode and where they came from.

    ABC ``K:`` fields state the mode (``K:Ador``), which music21 turns into a ``Key``; a bare
    key signature (MusicXML, Humdrum) does not, so those scores are analysed with music21's
    Krumhansl-Schmuckler key finder.
    """
    from music21 import key as m21key

    keys = list(score.recurse().getElementsByClass(m21key.Key))
    if keys:
        k = keys[0]
        return k.tonic.name.replace("-", "b"), k.mode, "key signature"
    k = score.analyze("key")
    return k.tonic.name.replace("-", "b"), k.mode, "analysis"


def _accent(position: float, *, beat_ql: float, bar_ql: float) -> int:
    """MIDI velocity from the metrical position: downbeats loudest, then beats, then the rest.

    Computed from the offset in the bar rather than music21's ``beatStrength``, which searches
    the score's context for every note and took a third of the analysis time.
    """
    eps = 1e-6
    if abs(position % bar_ql) < eps or abs(position % bar_ql - bar_ql) < eps:
        return 100
    if abs(position % beat_ql) < eps or abs(position % beat_ql - beat_ql) < eps:
        return 84
    return 70


def _part_notes(part, *, beat_ql: float, bar_ql: float) -> list[Note]:
    """One part's notes with absolute onsets; tied notes are merged into one.

    Ties are joined here (a tie start opens a note that the stop extends) instead of with
    ``Stream.stripTies``, which cost another third of the analysis time.
    """
    measures = list(part.getElementsByClass("Measure"))
    if measures:
        located = [
            (float(m.offset) + float(n.offset), float(n.offset) + float(m.paddingLeft), n)
            for m in measures
            for n in m.recurse().notes
        ]
    else:
        located = [(float(n.offset), float(n.offset), n) for n in part.flatten().notes]
    located.sort(key=lambda item: item[0])
    out: list[Note] = []
    open_ties: dict[int, int] = {}  # pitch -> index in out of the note a tie continues
    for onset, position, element in located:
        duration = float(element.quarterLength)
        if duration <= 0:  # grace notes take no time of their own
            continue
        tie = getattr(element, "tie", None)
        tie_type = tie.type if tie is not None else None
        velocity = _accent(position, beat_ql=beat_ql, bar_ql=bar_ql)
        for pitch in element.pitches:
            midi = int(pitch.midi)
            if tie_type in ("continue", "stop") and midi in open_ties:
                i = open_ties[midi]
                prev = out[i]
                out[i] = Note(prev.onset, onset + duration - prev.onset, prev.pitch, prev.velocity)
                if tie_type == "stop":
                    del open_ties[midi]
                continue
            out.append(Note(onset, duration, midi, velocity))
            if tie_type == "start":
                open_ties[midi] = len(out) - 1
    return out


def analyse_piece(ref: PieceRef) -> Piece:
    """Parse one score and read its notes, key, mode, metre and note density.

    Raises:
        ValueError: The score has no notes or no positive length (recorded as a skip reason).
    """
    from music21 import meter

    score = _parse(ref)
    if hasattr(score, "scores") and not hasattr(score, "parts"):  # an Opus of one tune
        score = score.scores[0]
    ts = next(iter(score.recurse().getElementsByClass(meter.TimeSignature)), None)
    beat_ql = float(ts.beatDuration.quarterLength) if ts is not None else 1.0
    bar_ql = float(ts.barDuration.quarterLength) if ts is not None else 4.0
    metre = ts.ratioString if ts is not None else "4/4"
    parts = list(getattr(score, "parts", [])) or [score]
    notes: list[Note] = []
    voices = 0
    for part in parts:
        part_notes = _part_notes(part, beat_ql=beat_ql, bar_ql=bar_ql)
        notes += part_notes
        voices += bool(part_notes)
    if not notes:
        raise ValueError("score has no notes")
    notes.sort(key=lambda n: (n.onset, n.pitch))
    length = max(n.onset + n.duration for n in notes)
    if length <= 0:
        raise ValueError("score has zero length")
    tonic, mode, key_source = _key_of(score)
    title = ref.labels.get("title") or (score.metadata.title if score.metadata else "") or ""
    licence = ref.labels["licence"]
    rights = getattr(score.metadata, "copyright", None) if score.metadata else None
    if rights:
        licence = f"{licence}; score metadata: {rights}"
    onsets = {n.onset for n in notes}
    return Piece(
        ref=ref,
        notes=tuple(notes),
        length_ql=length,
        beat_ql=beat_ql,
        metre=metre,
        tonic=tonic,
        mode=mode,
        key_source=key_source,
        polyphonic=voices > 1,
        notes_per_beat=len(onsets) / (length / beat_ql),
        title=str(title),
        licence=str(licence),
    )
