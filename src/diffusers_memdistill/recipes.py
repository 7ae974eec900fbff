"""The CPU-scale recipes of the digits experiments, one home for the flags that ``memdistill demo``,
``memdistill matched-quality`` and ``memdistill dmd-sweep`` pass to the training scripts.

They are the scripts' own flags, at the scale of 8x8 digits on a CPU; the papers' GPU recipes are the scripts'
defaults. Every saved model keeps the scripts' default EMA of its weights (EDM2's power function, sigma_rel = 0.05).
"""

# EDM teacher on 8x8 digits (the data flags are added by each command): at 32 images and 2000 steps it memorizes
# them almost completely.
TEACHER_ARGS = ["--resolution", "8", "--model_preset", "tiny", "--train_batch_size", "64", "--learning_rate", "2e-3",
                "--lr_warmup_steps", "100", "--num_validation_images", "16"]
# Consistency distillation: pseudo-Huber distance (LPIPS weights need a download), the script's other defaults.
CD_ARGS = ["--loss", "pseudo_huber", "--train_batch_size", "64", "--num_validation_images", "16"]
# DMD: the papers' learning rate 2e-6 would need ~100x more steps; 2e-4 for both networks moves the one-step
# generator from the teacher's blurred one-step output to digits within 200 generator updates.
DMD_ARGS = ["--train_batch_size", "64", "--learning_rate", "2e-4", "--lr_warmup_steps", "50",
            "--num_validation_images", "16"]
# Progressive distillation: pseudo-Huber, 2e-4 with the script's linear decay per round (not tuned).
PD_ARGS = ["--loss", "pseudo_huber", "--train_batch_size", "64", "--learning_rate", "2e-4", "--lr_warmup_steps", "0",
           "--num_validation_images", "16"]
