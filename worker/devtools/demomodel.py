"""Demo models for development and CI, made locally and deterministically, never downloaded.

`make_tiny_llama` writes a 459k-parameter Llama (byte-level BPE tokenizer trained on a few
fixed sentences, seeded weights, safetensors) that real vLLM loads; it needs the `models`
extra (torch, transformers, tokenizers, safetensors). `make_echo_model` writes a small
deterministic blob for the echo engine and needs nothing. `write_archive` packs a model
directory the way the network distributes models: a tar whose bytes, and so whose SHA-256,
depend only on the files' names and contents.
"""

import hashlib
import importlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

SEED = 0
VOCAB_SIZE = 512
INIT_STD = 0.1
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A Resultity node turns a GPU or a CPU into a trustworthy worker of an inference network.",
    "Every result is signed with the node's key and published back to the network.",
    "Jobs arrive in batches; the runtime answers each one with tokens and text.",
    "Models are verified by their SHA-256 before they are ever loaded.",
    "Small models are fast, deterministic and good enough for tests.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" @ # $ % & _",
    "once upon a time there was a tiny language model that only knew a few sentences",
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"
    "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The demo model's chat template (Jinja, as `tokenizer_config.json` ships it)."""

ModelKind = Literal["llama", "echo"]
TORCH_WHEEL_HINT = "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


@dataclass(frozen=True, slots=True)
class DemoModel:
    """A model directory and its distribution archive."""

    directory: Path
    archive: Path
    sha256: str
    size: int


def _optional(module: str) -> Any:
    """The ML libraries are an optional extra, imported (untyped) only when a model is made."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is missing: pip install {TORCH_WHEEL_HINT} and '.[models]'"
        ) from exc


def _tokenizer() -> Any:
    tokenizers = _optional("tokenizers")
    transformers = _optional("transformers")
    decoders, pre_tokenizers = tokenizers.decoders, tokenizers.pre_tokenizers
    processors, trainers = tokenizers.processors, tokenizers.trainers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    )


def make_tiny_llama(directory: Path, *, seed: int = SEED, layers: int = 2) -> Path:
    """Write the tiny Llama (hidden 128, 2 layers) into `directory`; same bytes every run
    (another `seed` or `layers` makes another model, for tests that need a second one)."""
    torch = _optional("torch")
    transformers = _optional("transformers")

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # A wider init than the default (0.02) so that greedy text is not one repeated token.
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    _ship_chat_template(directory)
    for path in directory.rglob("*"):
        # Readable by the runtime's unprivileged user when mounted as is.
        path.chmod(0o755 if path.is_dir() else 0o644)
    log.info("demo_model_written kind=llama dir=%s", directory)
    return directory


def _ship_chat_template(directory: Path) -> None:
    """Put the chat template into `tokenizer_config.json` (where the node's runtime reads it),
    not in a separate file, and write that file in one canonical form."""
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def make_echo_model(directory: Path, size: int = 64 << 10) -> Path:
    """Write a small deterministic model for the echo engine (no ML dependencies)."""
    directory.mkdir(parents=True, exist_ok=True)
    blob = hashlib.shake_256(b"resultity echo demo model").digest(size)
    (directory / "weights.bin").write_bytes(blob)
    (directory / "config.json").write_text(
        json.dumps({"engine": "echo", "name": "echo-demo", "size": size}, sort_keys=True) + "\n"
    )
    log.info("demo_model_written kind=echo dir=%s", directory)
    return directory


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_archive(directory: Path, archive: Path) -> str:
    """Pack every file under `directory` (sorted, mtime 0, owner 0, ustar, no pax headers)
    into `archive`; return its SHA-256."""
    files = sorted(
        (p.relative_to(directory).as_posix(), p) for p in directory.rglob("*") if p.is_file()
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, path in files:
            data = path.read_bytes()
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def make_demo_model(root: Path, kind: ModelKind = "llama") -> DemoModel:
    """Write `root/<name>/` and `root/<name>.tar` for a demo model of `kind`."""
    name = "tiny-llama" if kind == "llama" else "echo-demo"
    directory = root / name
    if kind == "llama":
        make_tiny_llama(directory)
    else:
        make_echo_model(directory)
    archive = root / f"{name}.tar"
    sha256 = write_archive(directory, archive)
    log.info("demo_model_archived kind=%s sha256=%s size=%d", kind, sha256, archive.stat().st_size)
    return DemoModel(directory, archive, sha256, archive.stat().st_size)
