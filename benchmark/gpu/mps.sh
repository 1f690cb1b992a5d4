# Sourced by the GPU scripts whose ranks share a GPU: start an MPS daemon, stopped when the
# script exits. Time-sliced processes make a device spin wait cost a ~2 ms slice; under MPS they
# run concurrently. The pipe directory is the one nanocp.envs.mps_active looks for.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps CUDA_MPS_LOG_DIRECTORY=/tmp/nvidia-mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY" && nvidia-cuda-mps-control -d
trap 'echo quit | nvidia-cuda-mps-control' EXIT
