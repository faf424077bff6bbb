"""Run every benchmark in turn; each writes results/NAME.json and results/NAME.md."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["throughput.py", "performance.py", "cifar10_teacher.py", "distill_attack.py", "backdoored_teachers.py"]

if __name__ == "__main__":
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], cwd=HERE, check=True)
