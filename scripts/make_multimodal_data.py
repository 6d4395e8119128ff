"""Speech and images for omni-tiny's multimodal training and its held-out evaluation set.

Everything is made here, offline, deterministically:
- speech: espeak-ng (the Debian package; `--espeak` names the binary) reads English sentences of the corpus
  and spoken sums ("forty seven plus thirty eight") in several voices and speeds; its 22,050 Hz output is
  resampled to the 16 kHz that the Whisper features of Qwen3OmniMoeProcessor expect (band-limited FFT
  resampling, numpy), written as 16 kHz mono int16 .wav.
- images: Pillow renders the same texts (sums as "47 + 38", short sentences, text lines) in black on white,
  DejaVu fonts, 64 pixels high (two rows of the vision tower's merged 32 x 32 tokens).

Tasks (the prompt format `omnilab generate --audio/--image` uses: the placeholders, then the prompt text):
- transcribe / read: media alone -> the text, then <|endoftext|>  (sums transcribe as "47 + 38")
- answer a sum: media then " =" -> " 85", then <|endoftext|>     (the text format is "47 + 38 = 85")

Held-out split (`--heldout`, committed as data/eval/multimodal/): 2-digit sums from the text model's held-out
addition pairs (never trained in either order, as text, speech or image), short sentences of held-out
Wikipedia documents (data/eval/eval.jsonl), each spoken in a trained voice and in a voice never used in
training (HELDOUT_VOICE), and rendered as an image. `manifest.jsonl` rows:
  {"id", "kind": "sum" | "sentence", "text", "answer" (sums), "voice", "speed", "wav": "speech/<id>.wav",
   "png": "image/<id>.png", "split": "heldout"}

Run:
  python scripts/make_multimodal_data.py --heldout                      # data/eval/multimodal/
  python scripts/make_multimodal_data.py --heldout --out DIR --sums 200 --sentences 100   # a larger set
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omni_tiny_common import EVAL_DIR, SCRATCH, heldout_addition_pairs, read_jsonl  # noqa: E402

SAMPLING_RATE = 16000  # omnilab.model.multimodal.SAMPLING_RATE (Whisper features)
ESPEAK_RATE = 22050  # espeak-ng's own voices
MULTIMODAL_DIR = EVAL_DIR / "multimodal"

# espeak-ng voices: accent x variant. The held-out voice's accent (Caribbean English) is never trained on.
TRAIN_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp"]
TRAIN_VARIANTS = ["", "+m1", "+m3", "+f1", "+f2", "+f4"]
TRAIN_VOICES = [a + v for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS]
TRAIN_SPEEDS = (130, 210)  # words per minute, uniform
SEEN_VOICE = "en-us"  # a trained voice, for the held-out texts
HELDOUT_VOICE = "en-029"
EVAL_SPEED = 170
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
TRAIN_FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"]
EVAL_FONT = "DejaVuSans.ttf"
IMAGE_HEIGHT = 64
SENTENCE_CHARS = re.compile(r"^[A-Za-z0-9 ,.'\-]+$")

# ---------------------------------------------------------------- words

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..999 in words, as spoken: 47 -> "forty seven", 305 -> "three hundred five"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words takes 0..999, not {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def spoken_sum(a: int, b: int) -> str:
    return f"{number_words(a)} plus {number_words(b)}"


def sum_text(a: int, b: int) -> str:
    """What a spoken or written sum transcribes to: the text model's own format before " =". """
    return f"{a} + {b}"


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if s.strip()]


def usable_sentence(s: str, min_words: int, max_words: int, max_chars: int) -> bool:
    words = s.split()
    return (min_words <= len(words) <= max_words and len(s) <= max_chars and bool(SENTENCE_CHARS.match(s))
            and s[0].isupper() and s.endswith("."))


# ---------------------------------------------------------------- speech


def espeak_binary(path: str | None = None) -> str:
    exe = path or os.environ.get("ESPEAK_NG") or shutil.which("espeak-ng")
    if not exe:
        raise SystemExit("espeak-ng not found: install the Debian package espeak-ng or pass --espeak PATH")
    return exe


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by FFT: keep the spectrum below the lower Nyquist frequency."""
    n_out = int(round(len(x) * rate_out / rate_in))
    spec = np.fft.rfft(x.astype(np.float64))  # [n/2 + 1]
    keep = n_out // 2 + 1
    spec = spec[:keep] if len(spec) >= keep else np.pad(spec, (0, keep - len(spec)))
    return np.fft.irfft(spec, n=n_out) * (n_out / len(x))  # [n_out]


def synth(text: str, voice: str, speed: int, exe: str | None = None, *, fast: bool = False) -> np.ndarray:
    """espeak-ng speaking `text` -> int16 samples at 16 kHz. fast: pad the 22,050 Hz samples with silence to a
    multiple of 28,224 (= 441 * 64, so both FFT lengths have small prime factors) before resampling and crop
    after (training data; the held-out set is resampled unpadded)."""
    out = subprocess.run([espeak_binary(exe), "-v", voice, "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    data = out.find(b"data")
    if out[:4] != b"RIFF" or data < 0:
        raise RuntimeError(f"espeak-ng -v {voice}: no wav output ({out[:80]!r})")
    pcm = np.frombuffer(out[data + 8:len(out) - (len(out) - data - 8) % 2], dtype="<i2").astype(np.float64)
    n_out = int(round(len(pcm) * SAMPLING_RATE / ESPEAK_RATE))
    if fast:
        pcm = np.pad(pcm, (0, -len(pcm) % 28224))
    y = resample(pcm / 32768.0, ESPEAK_RATE, SAMPLING_RATE)[:n_out]
    return (np.clip(y, -1.0, 32767 / 32768) * 32768).round().astype("<i2")


def wav_bytes(pcm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLING_RATE)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


# ---------------------------------------------------------------- images


def render(text: str, font: str = EVAL_FONT, size: int = 30, *, dx: int = 8, dy: int = 0, ink: int = 0,
           paper: int = 255, font_dir: Path = FONT_DIR):
    """`text` on one line, `size`-pixel font, grey level `ink` on grey level `paper` (black on white by default),
    IMAGE_HEIGHT pixels high -> RGB PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    face = ImageFont.truetype(str(Path(font_dir) / font), size)
    left, top, right, bottom = face.getbbox(text)
    width = right - left + dx + 8  # dx pixels of margin on the left, 8 on the right
    im = Image.new("RGB", (max(width, IMAGE_HEIGHT), IMAGE_HEIGHT), (paper, paper, paper))
    y = (IMAGE_HEIGHT - (bottom - top)) // 2 - top + dy  # centred, shifted by dy
    ImageDraw.Draw(im).text((dx - left, y), text, font=face, fill=(ink, ink, ink))
    return im


def render_spec(spec: dict, font_dir: Path = FONT_DIR):
    """One training image spec of train_specs -> its RGB PIL image."""
    return render(spec["text"], spec["font"], spec["size"], dx=spec["dx"], dy=spec["dy"], ink=spec["ink"],
                  paper=spec["paper"], font_dir=font_dir)


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------- the held-out set


def heldout_items(n_sums: int, n_sentences: int, seed: int = 2026) -> list[dict]:
    """Held-out sums (from the held-out addition pairs) and short held-out sentences, each in the seen voice
    and in the held-out voice."""
    rng = random.Random(seed)
    pairs = heldout_addition_pairs()
    pairs = rng.sample(pairs, n_sums)
    sentences = []
    for r in read_jsonl(EVAL_DIR / "eval.jsonl"):
        if r["domain"] == "en":
            sentences += [s for s in split_sentences(r["text"]) if usable_sentence(s, 4, 9, 48)]
    sentences = sorted(set(sentences))
    sentences = rng.sample(sentences, min(n_sentences, len(sentences)))  # the held-out split has ~40 short ones
    rows = []
    for i, (a, b) in enumerate(pairs):
        if rng.random() < 0.5:
            a, b = b, a
        for tag, voice in (("s", SEEN_VOICE), ("h", HELDOUT_VOICE)):
            rows.append({"id": f"sum{i:03d}{tag}", "kind": "sum", "text": sum_text(a, b), "answer": str(a + b),
                         "spoken": spoken_sum(a, b), "voice": voice, "speed": EVAL_SPEED})
    for i, s in enumerate(sentences):
        for tag, voice in (("s", SEEN_VOICE), ("h", HELDOUT_VOICE)):
            rows.append({"id": f"sent{i:03d}{tag}", "kind": "sentence", "text": s, "spoken": s,
                         "voice": voice, "speed": EVAL_SPEED})
    for r in rows:
        r.update(wav=f"speech/{r['id']}.wav", png=f"image/{r['id']}.png", split="heldout")
    return rows


def write_heldout(out: Path, n_sums: int, n_sentences: int, exe: str | None) -> list[dict]:
    rows = heldout_items(n_sums, n_sentences)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "speech").mkdir(parents=True)
    (tmp / "image").mkdir()
    for r in rows:
        (tmp / r["wav"]).write_bytes(wav_bytes(synth(r["spoken"], r["voice"], r["speed"], exe)))
        (tmp / r["png"]).write_bytes(png_bytes(render(r["text"])))
    with open(tmp / "manifest.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return rows


# ---------------------------------------------------------------- training items


def train_sentences(corpus: Path = SCRATCH / "corpus" / "en.jsonl") -> list[str]:
    """English sentences of the training split (build_corpus.py's .scratch/corpus/en.jsonl)."""
    out = []
    for r in read_jsonl(corpus):
        out += [s for s in split_sentences(r["text"]) if usable_sentence(s, 3, 16, 100)]
    return sorted(set(out))


def text_line(sentence: str, rng: random.Random, max_chars: int = 40) -> str:
    """A line of at most max_chars characters: consecutive words of a sentence."""
    words = sentence.split()
    start = rng.randrange(len(words))
    line = words[start]
    for w in words[start + 1:]:
        if len(line) + 1 + len(w) > max_chars:
            break
        line += " " + w
    return line[:max_chars]


def train_pairs(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Sums for training: operands 0..999 (2-digit most often), never a held-out 2-digit pair in either order."""
    forbidden = {p for a, b in heldout_addition_pairs() for p in ((a, b), (b, a))}
    kinds = [((2, 2), 5.0), ((1, 2), 1.0), ((2, 1), 1.0), ((1, 1), 0.5), ((3, 3), 1.0), ((2, 3), 0.5), ((3, 2), 0.5)]
    out = []
    while len(out) < n:
        (da, db), = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])
        a = rng.randrange(0 if da == 1 else 10 ** (da - 1), 10 ** da)
        b = rng.randrange(0 if db == 1 else 10 ** (db - 1), 10 ** db)
        if (a, b) not in forbidden:
            out.append((a, b))
    return out


def train_specs(sentences: list[str], n_speech_sent: int, n_speech_sum: int, n_image_line: int,
                n_image_sum: int, seed: int, *, sizes: tuple[int, int] = (22, 34),
                paper: tuple[int, int] = (255, 255), inverted: float = 0.0) -> list[dict]:
    """What to synthesize and render for training: {"media": "audio" | "image", "kind", "text", "answer",
    "spoken" / "voice" / "speed" (audio) or "font" / "size" / "dx" / "dy" / "ink" / "paper" (image)}.
    Images: font sizes in `sizes`, paper grey levels in `paper`, ink from black to 165 levels below the paper
    (on white: 0-90; black on paper darker than 165); a fraction `inverted` is light ink on dark paper, the
    same contrast."""
    rng = random.Random(seed)
    specs = []
    for s in rng.sample(sentences, min(n_speech_sent, len(sentences))):
        specs.append({"media": "audio", "kind": "sentence", "text": s, "spoken": s})
    for a, b in train_pairs(n_speech_sum, rng):
        specs.append({"media": "audio", "kind": "sum", "text": sum_text(a, b), "answer": str(a + b),
                      "spoken": spoken_sum(a, b)})
    for sp in specs:
        sp.update(voice=rng.choice(TRAIN_VOICES), speed=rng.randint(*TRAIN_SPEEDS))
    images = [{"media": "image", "kind": "sentence", "text": text_line(rng.choice(sentences), rng)}
              for _ in range(n_image_line)]
    images += [{"media": "image", "kind": "sum", "text": sum_text(a, b), "answer": str(a + b)}
               for a, b in train_pairs(n_image_sum, rng)]
    for im in images:
        im.update(font=rng.choice(TRAIN_FONTS), size=rng.randint(*sizes), dx=rng.randint(0, 24),
                  dy=rng.randint(-6, 6))
        level = rng.randint(*paper)
        ink = rng.randint(0, max(0, level - 165))  # a contrast of min(165, paper) at least (white paper: ink 0-90)
        if rng.random() < inverted:  # light ink on dark paper
            level, ink = 255 - level, 255 - ink
        im.update(paper=level, ink=ink)
    return specs + images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", action="store_true", help="write the held-out evaluation set")
    ap.add_argument("--out", type=Path, default=MULTIMODAL_DIR)
    ap.add_argument("--sums", type=int, default=12, help="held-out sums (each in two voices)")
    ap.add_argument("--sentences", type=int, default=8, help="held-out sentences (each in two voices)")
    ap.add_argument("--espeak", default=None, help="espeak-ng binary (default: on PATH)")
    args = ap.parse_args()
    if not args.heldout:
        ap.error("nothing to do: pass --heldout (training data is made by scripts/train_multimodal.py)")
    rows = write_heldout(args.out, args.sums, args.sentences, args.espeak)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{len(rows)} items, {size:,} bytes in {args.out}")


if __name__ == "__main__":
    main()
