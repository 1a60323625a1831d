"""Where the repository and the shared conformance data are."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = ROOT.parent / "shared" / "reference"
