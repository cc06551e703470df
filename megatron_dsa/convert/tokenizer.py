"""The project's sentencepiece model as a Hugging Face fast tokenizer.

``AutoTokenizer.from_pretrained(hf_dir)`` then loads a ``PreTrainedTokenizerFast`` whose
``tokenizer.json`` is converted from the sentencepiece proto by transformers' own
``SpmConverter.build_tokenizer_from_spm_proto`` (BPE merges ranked by piece score, the
normalizer spec, byte fallback). ``save_hf_tokenizer`` checks the result against
sentencepiece itself on sample text (code, digits, whitespace runs, non-ASCII, bytes that
need the fallback) before anything is written, and fails if a single id differs.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_dsa.convert.errors import ConversionError

SAMPLE_TEXTS = (
    "def main(argv):\n    return 0  # done\n",
    "Hello, world! 1234567890 3.14159e-10",
    "  leading and  multiple   spaces\tand\ttabs\n\n\nnewlines  ",
    "class Foo(Bar):\n\tx: int = 42\n\tdef __init__(self): ...\n",
    "naïve café — Grüße, 東京, Москва, 🙂🚀",
    "if (a<=b && c!=d) { x[i] = y->z; }",
    "\u2581 raw marker and \x00\x07 control bytes",
    "",
)


def _sp_processor(model_path: Path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_path.read_bytes())
    except (RuntimeError, OSError) as error:
        raise ConversionError(f"not a sentencepiece model: {model_path} ({error})") from None
    return sp


def build_hf_tokenizer(model_path: str | os.PathLike[str]):
    """A ``PreTrainedTokenizerFast`` equivalent to the sentencepiece model at ``model_path``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    from tokenizers import AddedToken

    path = Path(model_path)
    if not path.is_file():
        raise ConversionError(f"tokenizer file not found: {path}")
    sp = _sp_processor(path)
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type == 1:  # unigram
        vocab = [(p.piece, p.score) for p in proto.pieces]
    elif proto.trainer_spec.model_type == 2:  # bpe
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    else:
        raise ConversionError(
            f"sentencepiece model type {proto.trainer_spec.model_type} of {path} is not supported "
            "(only unigram and bpe)"
        )
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if backend is None:
        raise ConversionError(f"transformers could not convert the sentencepiece model {path}")

    def piece(i: int):
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    specials = dict(
        unk_token=piece(sp.unk_id()), bos_token=piece(sp.bos_id()),
        eos_token=piece(sp.eos_id()), pad_token=piece(sp.pad_id()),
    )
    specials = {k: v for k, v in specials.items() if v is not None}
    # Control pieces (<s>, </s>, <pad>, ...) are special tokens: never produced from text by
    # sentencepiece, so they must not be matched in text either (split_special_tokens).
    controls = [p.piece for p in proto.pieces if p.type == 3]
    backend.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in controls])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
        model_max_length=int(1e30),
        **specials,
    )
    return tok


def check_same_ids(hf_tokenizer, model_path: str | os.PathLike[str], texts=SAMPLE_TEXTS) -> None:
    """Raise ConversionError unless the HF tokenizer encodes ``texts`` exactly as sentencepiece."""
    sp = _sp_processor(Path(model_path))
    for text in texts:
        want = sp.encode(text)
        got = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != want:
            raise ConversionError(
                f"the converted Hugging Face tokenizer disagrees with sentencepiece on {text!r}: "
                f"{got[:20]} vs {want[:20]}"
            )


def save_hf_tokenizer(model_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ the original tokenizer.model) to out_dir."""
    import shutil

    tok = build_hf_tokenizer(model_path)
    check_same_ids(tok, model_path)
    tok.save_pretrained(str(out_dir))
    shutil.copyfile(model_path, Path(out_dir) / "tokenizer.model")
