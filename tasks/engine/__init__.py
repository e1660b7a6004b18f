"""Engine: everything that runs on torch. Model loading, attention and fused kernels, the loss,
packing, the training and evaluation loops, checkpoints, distributed training and export. The only
package that imports torch, transformers' models, peft and bitsandbytes; it may import the plain
packages, never Prefect or the top of tasks/ (stages, config, results)."""
