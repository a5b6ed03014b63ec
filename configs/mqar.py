"""MQAR (Zoology, Arora et al. 2024) and its variants: the protocol of Zoology's figure 2, a 2-layer model per
sequence layer trained on multi-query associative recall, swept over d_model, learning rate, seed and training
shape; the learning rate chosen on a validation split, the accuracy reported on a test split at the training
shape and at twice its length and pairs. For the five variants of docs/experiments.md: "base", "shared",
"update", "forget" (Update-MQAR with every key rewritten once: Zoology's forgetting layout), "block".

Zoology's figure 2 recipe: vocabulary 8192, (seq_len, pairs) in (64, 4), (128, 8), (256, 16) (and (512, 64),
which its config lists but did not run), d_model 64-512, learning rates logspace(-4, -2, 4), 100,000 training
examples, no MLP, early stop at 0.99 held-out accuracy. Its budget is 64 epochs; ours is the same for every
model and stated here: 3,000 steps of 256 sequences (7.7 epochs of the 100,000), warm-up 300, evaluated every
250 steps, stopped at 0.99 validation accuracy. Three seeds (initialization and data order; the data is fixed
by ``data_seed``). Design layers on ``backend = "auto"``: the Pallas kernels on a GPU, the chunked form on a
CPU. On an H200 one run's training step at d_model 512 ran 1.2-1.5x faster on the kernels than on ``chunked`` for
Mamba-2, DeltaNet and Gated DeltaNet, 1.07x for the Bayesian Layer before its backward kernel
(docs/results/gpu_kernels.md); the kernels multiply these float32 layers' operands in TF32, ``chunked`` in full
float32. The kernels under the sweep engine's ``jax.vmap`` are tested on CPU only (tests/test_pallas_vmap.py:
in Pallas's interpreter equal to each run alone; the vectorized training step lowered for CUDA holds the
kernels and no reference); they have not yet run vectorized on a GPU. On several devices each device's
kernels take its own runs (docs/experiments.md, "Sweeps"). A run records the resolved backend
(``"pallas"`` or ``"chunked"``), so a workdir begun on ``chunked`` resumes with ``--config.backend=chunked``.

    python -m experiments.mqar --config=configs/mqar.py --workdir=runs/mqar
    python -m experiments.mqar --config=configs/mqar.py --config.smoke=True --workdir=/tmp/mqar
    python -m experiments.mqar --config=configs/mqar.py --workdir=runs/mqar \
        --config.variants='("base","update")' --config.train_shapes='((256,16),(512,64))' --config.d_models='(64,)'

Writes runs/<variant>/<model>/L<seq_len>_P<pairs>/d<d_model>_lr<lr>_seed<seed>/ (checkpoints, metrics.csv,
eval.csv, results.json) and, over every finished run in the workdir, results.csv, table.md,
accuracy_vs_d_model.png, accuracy_vs_state_size.png and (for cells trained at several shapes)
accuracy_vs_seq_len.png. An interrupted sweep resumes where it stopped (finished runs are skipped, the
interrupted ones restart from their checkpoints). Zoology's mixed-length sweep ("original MQAR") is
`configs/mqar_original.py`.
"""
import ml_collections

from configs import training


def get_config():
    config = ml_collections.ConfigDict()
    # the sweep: variants x training sets x models x d_model x learning rate x seed (training.py)
    config.variants = ("base", "shared", "update", "forget", "block")
    config.models = ("attention", "linear_attention", "mamba2", "deltanet", "gated_deltanet", "bayesian",
                     "bayesian_no_conv")
    config.d_models = (64, 128, 256, 512)
    config.learning_rates = (1e-4, 4.6e-4, 2.2e-3, 1e-2)      # np.logspace(-4, -2, 4), as Zoology
    config.train_shapes = ((64, 4), (128, 8), (256, 16), (512, 64))   # (seq_len, num_kv_pairs)
    # Zoology's mixed-length training set instead of train_shapes: ((seq_len, pairs, examples), ...), padded to
    # the longest; tested on test_shapes (configs/mqar_original.py). Empty: one training set per train shape.
    config.train_mixture = ()
    # The test split: at test_shapes when given, else at (seq_len multiplier, pairs multiplier) of the training
    # shape; shapes that a variant's layout cannot fit are skipped (and logged).
    config.test_shapes = ()
    # True: the training examples laid end to end into rows of the training set's longest length, each step
    # batch_size examples on average in fewer rows, every sequence layer reset at each example's start
    # (experiments.tasks.pack; docs/experiments.md section 4). Each example's logits are those it has padded,
    # but the steps group other examples than the padded order does. False: one example per row, padded.
    config.pack = False
    config.eval_multipliers = ((1, 1), (2, 2))
    # data (experiments.tasks.mqar)
    config.vocab_size = 8192
    # "split": Zoology's halves (keys [1, V/2), values [V/2, V)) for base, update and block, the shared pool
    # for the variant "shared"; "shared": every variant draws its keys and values from one pool [1, V)
    config.vocabulary = "split"
    config.num_train_examples = 100_000
    config.num_valid_examples = 1_000   # the validation split, at the training shape(s): early stop, learning rate
    config.num_eval_examples = 1_000    # each test shape
    config.power_a = 0.01
    config.random_filler = True
    config.num_updates = 0            # update variant: rebinding pairs; 0 means num_kv_pairs (forget: always)
    config.block_gap = 6              # block variant: separators between a key and its value (> 2 * (4 - 1) - 1)
    config.data_seed = 0
    training.add_model_and_training(config, num_steps=3000, batch_size=256, warmup_steps=300)
    config.backend = "auto"           # pallas on a GPU, chunked on a CPU; runs record which (models.lowering_of)
    config.smoke = False
    config.smoke_settings = ml_collections.ConfigDict({
        "variants": ("base", "update", "block"), "models": ("attention", "gated_deltanet", "bayesian_no_conv"),
        "d_models": (16,), "learning_rates": (3e-3,), "train_shapes": ((32, 2),),
        "eval_multipliers": ((1, 1), (2, 2)), "vocab_size": 64, "num_train_examples": 64,
        "num_valid_examples": 16, "num_eval_examples": 16, **training.SMOKE,
    })
    return config
