"""A small SentencePiece-style BPE vocabulary, trained here and tokenized by llama.cpp itself."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

SPACE = "\u2581"  # '▁', SentencePiece's visible space
SPECIAL = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# llama.cpp token types (llama_token_type / gguf.TokenType)
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_BYTE = 1, 2, 3, 6

# A plain-text chat template: the bundled model continues text, so messages are joined as paragraphs.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}\n\n{% endfor %}")


@dataclass
class Vocab:
    """Pieces with SentencePiece scores and llama.cpp token types."""

    pieces: list[str]
    scores: list[float]
    types: list[int]

    def __len__(self) -> int:
        return len(self.pieces)


def _chunks(text: str) -> Counter:
    """Word-like chunks ('▁word', '\\n') with their counts, as SentencePiece sees the text."""
    text = SPACE + text.replace(" ", SPACE)
    return Counter(re.findall(f"{SPACE}?[^{SPACE}\\n]+|{SPACE}|\\n", text))


def train_bpe(text: str, vocab_size: int, min_char_count: int = 5) -> Vocab:
    """Learn BPE merges; a merge learned earlier gets a higher score, as llama.cpp's SPM tokenizer expects."""
    words = _chunks(text)
    char_counts = Counter()
    for w, c in words.items():
        for ch in w:
            char_counts[ch] += c
    alphabet = sorted(ch for ch, c in char_counts.items()
                      if c >= min_char_count and (ch.isprintable() or ch in ("\n", SPACE)))
    pieces = [*SPECIAL, *(f"<0x{b:02X}>" for b in range(256))]
    types = [TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL, *([TYPE_BYTE] * 256)]
    scores = [0.0] * len(pieces)
    pieces += alphabet
    types += [TYPE_NORMAL] * len(alphabet)
    scores += [0.0] * len(alphabet)
    known = set(pieces)

    seqs = [list(w) for w in words]
    freqs = list(words.values())
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, seq in enumerate(seqs):
        for a, b in zip(seq, seq[1:]):
            pair_counts[(a, b)] += freqs[i]
            where.setdefault((a, b), set()).add(i)

    rank = 0
    while len(pieces) < vocab_size and pair_counts:
        best, count = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merged = best[0] + best[1]
        for i in where.pop(best, ()):
            seq, f = seqs[i], freqs[i]
            for a, b in zip(seq, seq[1:]):
                pair_counts[(a, b)] -= f
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == best[0] and seq[j + 1] == best[1]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
            for a, b in zip(out, out[1:]):
                pair_counts[(a, b)] += f
                where.setdefault((a, b), set()).add(i)
        pair_counts = Counter({p: c for p, c in pair_counts.items() if c > 0}) if rank % 200 == 199 else pair_counts
        pair_counts.pop(best, None)
        if merged not in known:
            rank += 1
            known.add(merged)
            pieces.append(merged)
            types.append(TYPE_NORMAL)
            scores.append(-float(rank))
    return Vocab(pieces, scores, types)


def add_vocab_to_gguf(writer, vocab: Vocab) -> None:
    """Write the vocabulary as a llama.cpp 'llama' (SentencePiece) tokenizer."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.pieces)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHAT_TEMPLATE)


def byte_vocab(size: int = 512) -> Vocab:
    """A vocabulary of specials, bytes and filler pieces, for generated random-weight models."""
    pieces = [*SPECIAL, *(f"<0x{b:02X}>" for b in range(256))]
    types = [TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL, *([TYPE_BYTE] * 256)]
    printable = [chr(c) for c in range(33, 127)]
    pieces += printable + [SPACE]
    types += [TYPE_NORMAL] * (len(printable) + 1)
    i = 0
    while len(pieces) < size:
        pieces.append(f"<extra_{i}>")
        types.append(TYPE_NORMAL)
        i += 1
    return Vocab(pieces[:size], [0.0] * size, types[:size])
