"""Where kanmoe's shipped files live, so code and tests never hard-code relative paths."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"
CONFIGS_DIR = PROJECT_ROOT / "configs"
CALIFORNIA_HOUSING_CSV = DATA_DIR / "california_housing.csv.gz"
