// agpt train --gpus N: N processes on this node, one per GPU, without MPI (as torchrun starts PyTorch's).
#pragma once

// Starts n copies of exe with argv (argv[0] included; NULL-terminated). Child i gets AGPT_RANK=i,
// AGPT_LOCAL_RANK=i, AGPT_WORLD_SIZE=n and AGPT_NCCL_ID=nccl_id_hex (runtime/comm.h reads them). SIGINT and
// SIGTERM to the launcher go to every child (they save and stop). When a child exits non-zero or is killed, the
// launcher says which rank and how, sends the others SIGTERM and, after grace_s seconds, SIGKILL. Returns 0 when
// every child exited 0, else the first failure's exit status (128 + the signal for a killed one), or 1 when a
// child could not be started.
int launch_local(const char *exe, char *const argv[], int n, const char *nccl_id_hex, double grace_s);
