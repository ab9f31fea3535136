"""The machine: GPUs through NVML, host CPU and RAM, the environment check (%amp_check)."""
