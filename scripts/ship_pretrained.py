"""Copy a finished `hmamba train` run into hmamba/pretrained/NAME, the model `hmamba generate` ships with.

Keeps the weights, config, tokenizer, generation config and train_results.json (without the per-step log);
drops checkpoints and the remote-code .py files (the package itself provides the classes; save_pretrained
writes the .py files again when the model is saved for sharing).

    python scripts/ship_pretrained.py runs/kjv kjv-small
"""

import argparse
import json
import shutil
from pathlib import Path

from hmamba.atomic import atomic_output_dir
from hmamba.conversion.checkpoints import TOKENIZER_FILE

KEEP = ("model.safetensors", "generation_config.json")  # and every tokenizer file


def ship(run_dir, name):
    run_dir, target = Path(run_dir), Path(__file__).parents[1] / "hmamba" / "pretrained" / name
    with atomic_output_dir(target, overwrite=True) as staging:
        for file in KEEP + tuple(f.name for f in run_dir.iterdir() if f.is_file() and TOKENIZER_FILE.match(f.name)):
            shutil.copy(run_dir / file, staging / file)
            (staging / file).chmod(0o644)  # transformers writes model.safetensors private (0600)
        config = json.loads((run_dir / "config.json").read_text())
        config.pop("auto_map", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        results = json.loads((run_dir / "train_results.json").read_text())
        results.pop("log_history", None)
        (staging / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"shipped {run_dir} as {target}: {sorted(p.name for p in target.iterdir())}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished `hmamba train` output folder")
    parser.add_argument("name", help="the shipped model's name: hmamba/pretrained/NAME is replaced")
    args = parser.parse_args()
    ship(args.run_dir, args.name)
