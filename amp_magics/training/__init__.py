"""The training loop and what it produces: options, scaler, telemetry, checkpoints, alarms, runs, sweeps."""
