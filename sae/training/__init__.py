"""Train dictionaries on a stream of activation batches: one loop for one SAE, one SAE per site,
or a sweep of SAEs on the same site, on CPU, one GPU or many processes (torchrun).

Per step t, for every dictionary D reading site s (the recipe of Gao et al. 2024, "Scaling and
evaluating sparse autoencoders", as the peer trainers SAELens, dictionary_learning and sparsify
implement it):

    x      = s_site · batch[site]                        # [batch, d_in], E‖x‖² = d_in
    L, m   = D.training_loss(x, TrainState(t, T, dead, all_reduce))  # objective and metrics
    g      = ∇L                                          # averaged over ranks (data parallel)
    g_i   -= (g_i·w_i / ‖w_i‖²) w_i                      # if D.unit_norm_decoder: rows w_i of W_dec
    g     *= min(1, clip / ‖g‖)                          # gradient clipping, per dictionary
    θ      = Adam(θ, g, lr(t)),   w_i ← w_i / ‖w_i‖       # renormalise decoder rows after the step
    resample dead latents                                # when due, for D with resample_dead (ReLU)

- Normalisation: s_site = sqrt(d_in / E‖x‖²), estimated from the first `calibration_tokens`
  tokens of the stream, so the same hyper-parameters work at every site (SAELens'
  `expected_average_only_in`). It is folded into the weights when a dictionary is exported
  (`D.fold_scale(s)`: W_enc·s, W_dec/s, b_dec/s), so saved and returned dictionaries read raw
  activations. b_dec is initialised from the *scaled* calibration sample (`D.init_from_data`).
- Learning rate: lr(t) = lr · min(1, (t+1)/warmup) · min(1, (T−t)/decay_steps): linear warm-up,
  constant, then linear decay to 0 over the last `decay_fraction` of training; where warm-up and
  decay overlap (short runs) the two factors multiply (`schedule.lr_at`). Default lr per
  dictionary: `D.default_lr()` if the class defines it, else the TopK scaling law
  2e-4 / sqrt(n_latents / 2^14) (Gao et al. Fig. 3, as in dictionary_learning's TopKTrainer).
- Optimizer (`TrainConfig.optimizer`): "adam" (default; the fused kernel where PyTorch has one),
  or "signsgd": schedule-free sign descent, `ScheduleFreeSignSGD` (sparsify's default),
  default lr 5e-3 / sqrt(n_latents / 2^14), warm-up but no decay (the averaging replaces the
  schedule). It trains on y = (1-β) z + β x and returns/exports the average x. On the benchmark's
  synthetic data at 819k tokens it reaches a much lower FVU than Adam (benchmarks/README.md).
- Matmul precision (`TrainConfig.matmul_precision`, PyTorch's float32 matmul precision while
  training): "highest" (default, exact float32), "high" (TF32 on CUDA), "medium" (bfloat16
  products with float32 accumulation: on CPUs with AMX, such as the benchmark machine, the
  encoder's dense matmul runs ~2x faster; pre-activations then carry ~0.3% relative error, so
  the top-k choice can differ on near-ties). Weights, optimizer state and the sparse parts stay
  float32.
- Dead latents: a latent is dead when it has not fired for `dead_window` tokens, with
  dead_window = clamp(dead_window_fraction · total_tokens, min, max) so the window also triggers
  in short runs (the published 10M-token window never triggers below 10M tokens).
  The mask is passed to `training_loss` (AuxK uses it) and logged as `dead_fraction`.
- Dead-latent resampling (`TrainConfig.resample_dead`, on by default; `resample.py`): every
  dead window, during the first half of training, dictionaries that define `resample_dead`
  (ReLU SAEs) re-initialise their dead latents from badly reconstructed inputs (Bricken et al.
  2023) and the optimizer forgets those rows; logged as `resampled`. TopK-family SAEs rely on
  AuxK instead.
- Metrics (JSONL, one line per dictionary every `log_every` steps, averaged over the interval
  and the ranks): loss, fvu, sq_err_per_token (mean over tokens of ‖x − x̂‖², summed over d;
  "mse" always means the mean over elements, `sae.metrics`), l0, dead_fraction, grad_norm, lr,
  tokens_per_s, and the architecture's own terms (l1, auxk, ...).

The data stream. `batches` is either
  (a) a callable `start_step -> iterator of batches` whose first batch is batch number
      `start_step` (resumable without re-reading anything; e.g. `SyntheticActivations.stream`), or
  (b) any iterable of batches; on resume the trainer discards the first `start_step` batches, so
      the iterable must yield the same sequence when re-created (a seeded, deterministic source).
Every batch is the *global* batch: a Tensor [batch_size, d_in] (all dictionaries read it) or a
dict {site: Tensor[batch_size, d_site]} (each dictionary reads its site: `sites[name]`, else the
key equal to its name). Use `sae.buffer.rebatch` to cut chunks of another size.

Checkpoints (`checkpoint_dir`, every `checkpoint_every` steps and at the end) hold everything a
resumed run needs to continue bit-exactly (same batches, same thread count, CPU): unfolded
weights, Adam moments, RNG states, dead-latent counters, step, scales, the config. Each
checkpoint is a directory `step_NNNNNNNNN/` with `state.safetensors` + `trainer.json` (the
learning-rate schedule is a pure function of the step, so the step restores it), built
under a temporary name and renamed into place, so a run killed at any moment (SIGKILL included)
leaves only complete checkpoints; it also holds folded exports `dictionaries/<name>/` loadable
with `sae.load`. `resume=True` continues from the newest one, or starts fresh when there is none,
so the same command starts a run and restarts it after a crash or preemption. Non-finite activations, losses
or gradients stop the run with `NonFiniteError` naming the step, site and dictionary, before
anything is written, so the last checkpoint on disk is the last good one.

Data parallel: launch the same script with `torchrun --nproc_per_node N script.py`. Every rank
reads every global batch and trains on its slice of rows (batch_size must be divisible by N);
gradients (plus losses and fired-latent masks) are summed with one all_reduce per step and
divided by N, so all ranks apply the same update. gloo on CPU, nccl on GPU. Rank 0 writes
checkpoints, metrics and the progress bar. Losses that are means over rows (squared error, L1)
give the single-process update up to float rounding; so do TopK's FVU and AuxK losses, whose
batch-level normalisers (the variance of x and of the residual) are summed over ranks through
`TrainState.all_reduce`. BatchTopK's batch selection and threshold stay per rank.

Memory: one batch per site in flight plus running sums of scalar metrics between log steps;
nothing grows with the number of steps.

Modules: `config` (TrainConfig), `schedule` (learning rates), `optim` (optimizers and the decoder
constraint), `distributed` (torchrun plumbing), `checkpoint` (save / resume / export), `resample`
(dead-latent resampling), `loop` (the trainer and `train`).
"""
from __future__ import annotations

# re-exports: every name imported from sae.training before it became a package keeps working
from .checkpoint import (_FORMAT, EXPORT_DIR, STATE_FILE, TRAINER_FILE, latest_checkpoint,
                         load_checkpoint_dictionaries)
from .config import _TRAJECTORY_FIELDS, OPTIMIZERS, TrainConfig
from .distributed import _Dist
from .loop import _TENSOR, Batch, BatchStream, NonFiniteError, _metric_value, _Trainer, train
from .optim import ScheduleFreeSignSGD, _decoder_rows, _make_optimizer, _remove_parallel_grad, _renormalise
from .schedule import default_lr, lr_at

__all__ = ["TrainConfig", "train", "NonFiniteError", "default_lr", "lr_at", "latest_checkpoint",
           "load_checkpoint_dictionaries", "ScheduleFreeSignSGD"]
