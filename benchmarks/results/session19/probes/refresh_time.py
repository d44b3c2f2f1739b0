"""Seconds of the sampling copy's refresh: in place (copy_) against released and made again; SmolLM2, keep_freed_memory."""
import sys, time, torch
sys.path.insert(0, "/work/main")
import engine
engine.keep_freed_memory(); engine.bound_kernel_caches()
model, _ = engine.load_model_and_tokenizer(engine.DEFAULT_MODEL)
sampler = engine.make_sampling_model(model, torch.bfloat16)
inplace, remade = [], []
for _ in range(10):
    t = time.perf_counter(); engine.refresh_sampling_model(sampler, model); inplace.append(time.perf_counter() - t)
    engine.release_sampling_model(sampler, model)
    junk = torch.ones(64, 2**20)  # something else takes memory meanwhile, as activations would
    del junk
    t = time.perf_counter(); engine.refresh_sampling_model(sampler, model); remade.append(time.perf_counter() - t)
print("in place s:", " ".join(f"{x:.3f}" for x in inplace))
print("released and made again s:", " ".join(f"{x:.3f}" for x in remade))
