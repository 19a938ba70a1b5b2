/** Compute drivers. `process` is the embedded default; `qemu` and `kubernetes` come later behind the same contract. */
export type { AdminCredentials, ComputeAddress, ComputeDriver, ComputeExit, ComputeSpec, ComputeStatus, ControlData, WalSource } from './api.ts';
export { checkpointRecordEnd } from './pg-control.ts';
export { ProcessDriver, type ProcessDriverOptions } from './process.ts';
