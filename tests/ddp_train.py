"""Run by test_training.py under `accelerate launch --num_processes 2`: trains a tiny model with DDP and
writes each rank's final weights digest to OUTPUT_DIR/rank{N}.sha256."""

import hashlib
import sys

from transformers import TrainerCallback

from hmamba.train import train


class DigestWeights(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        with open(f"{args.output_dir}/rank{args.process_index}.sha256", "w") as f:
            f.write(digest.hexdigest())


if __name__ == "__main__":
    output_dir, corpus = sys.argv[1:3]
    overrides = {"hidden_size": 24, "state_size": 4, "num_low_layers": 1, "num_high_layers": 1, "num_out_layers": 1,
                 "chunk_size": 2}
    train(output_dir, data=corpus, config_overrides=overrides, block_size=32, batch_size=4, max_eval_blocks=4,
          max_steps=3, logging_steps=1, callbacks=[DigestWeights()])
