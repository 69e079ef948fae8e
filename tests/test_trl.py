"""The compiled sft split trains with TRL as it is: no conversion code here."""
import math

import datasets

from builder.compile import split_path


def test_sft_split_trains_one_step_with_trl(built, hf_smollm2, tmp_path):
    from trl import SFTConfig, SFTTrainer

    ws, _ = built
    sft = datasets.load_dataset("parquet", data_files=str(split_path(ws.generation_dir(1), "sft")), split="train")
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=1, max_length=256,
                     report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                     bf16=False,  # TRL defaults to bf16: emulated on a CPU without AMX, about 6x slower
                     dataset_kwargs={"skip_prepare_dataset": False})
    trainer = SFTTrainer(model=str(hf_smollm2), train_dataset=sft, args=args)
    result = trainer.train()
    assert result.global_step == 1
    assert math.isfinite(result.training_loss) and result.training_loss > 0
