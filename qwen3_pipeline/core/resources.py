"""Files shipped inside the package (found relative to it, so an installed wheel has them)."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The installed ``qwen3_pipeline`` directory."""

TOKENIZER_PATH = PACKAGE_DIR / "resources" / "qwen3_tokenizer.json.gz"
"""The real Qwen3 tokenizer (gzipped ``tokenizer.json``, the same ids as the hub's)."""
