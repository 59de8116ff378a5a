# The environment of a node of cluster/aws-gpu.yaml, sourced by its start commands right before
# `ray start`, so that every Ray process of the node (the raylet starts the workers) inherits it:
#
#   source ~/orch-aws/node-env.sh head      # or: worker
#
# - ORCH_LOCAL_DIR: node-local scratch (the GPU nodes' instance store, /opt/dlami/nvme on the DLAMI).
# - GPU workers: NCCL over EFA through the AWS OFI NCCL plugin the AMI ships (/opt/amazon/ofi-nccl).
# - WANDB_API_KEY from AWS Secrets Manager (secret `orch/wandb`, in the node's own region, readable
#   by the orch-node role: cluster/aws/iam/node-policy.json). When it cannot be read, one line
#   says why and W&B stays offline; the node starts all the same. The key is never printed.
# (sourced, not run: no `set -e`, no `exit`)

orch_role="${1:-worker}"

# The node's region, from the instance metadata service (IMDSv2), unless AWS_DEFAULT_REGION is set.
if [[ -z "${AWS_DEFAULT_REGION:-}" ]]; then
    orch_imds_token="$(curl -s -m 2 -X PUT http://169.254.169.254/latest/api/token \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' || true)"
    AWS_DEFAULT_REGION="$(curl -s -m 2 -H "X-aws-ec2-metadata-token: ${orch_imds_token}" \
        http://169.254.169.254/latest/meta-data/placement/region || true)"
    export AWS_DEFAULT_REGION
fi

if [[ "$orch_role" == "head" ]]; then
    export ORCH_LOCAL_DIR=/tmp/orch
else
    export ORCH_LOCAL_DIR=/opt/dlami/nvme/orch
    export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1 FI_EFA_FORK_SAFE=1
    export NCCL_SOCKET_IFNAME=^docker,lo,veth NCCL_DEBUG=WARN NCCL_ASYNC_ERROR_HANDLING=1
    export LD_LIBRARY_PATH="/opt/amazon/efa/lib:/opt/amazon/ofi-nccl/lib:${LD_LIBRARY_PATH:-}"
fi

orch_secret_id="${ORCH_WANDB_SECRET:-orch/wandb}"
if orch_key="$(aws secretsmanager get-secret-value --region "${AWS_DEFAULT_REGION}" --secret-id "${orch_secret_id}" \
        --query SecretString --output text 2>&1)" && [[ -n "$orch_key" ]]; then
    export WANDB_API_KEY="$orch_key"
else
    echo "orch: W&B stays offline on this node: cannot read secret ${orch_secret_id} in region" \
        "'${AWS_DEFAULT_REGION}' ($(echo "$orch_key" | tr '\n' ' ' | cut -c1-200)); create it with" \
        "\`aws secretsmanager create-secret --name ${orch_secret_id} --secret-string \"\$WANDB_API_KEY\"\`" >&2
fi
unset orch_key orch_secret_id orch_imds_token orch_role
