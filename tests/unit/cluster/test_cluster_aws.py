"""cluster/aws-gpu.yaml and cluster/aws/, checked by Ray's own cluster launcher code against a real
EC2 API on this machine (moto's `mock_aws`): cluster/aws/prepare.py makes the account's network and
roles, then Ray's schema check (`validate_config(prepare_config(...))`, what `ray up` runs first),
Ray's AWS bootstrap (`bootstrap_aws`: subnets vs `use_internal_ips`, security groups per node type)
and Ray's node provider (launching a head and a GPU worker) run against it, unchanged. Every EC2
call the autoscaler makes must be allowed by the head's IAM policy. The nodes' start environment
(cluster/aws/node-env.sh) runs in bash with a fake `aws`."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
AWS = REPO / "cluster" / "aws-gpu.yaml"
AWS_DIR = REPO / "cluster" / "aws"
DLAMI_ENV = "/opt/pytorch/bin/"  # the AMI's PyTorch virtual environment (DLAMI release notes: python_location)
DLAMI_SSM = re.compile(r"^resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                       r"oss-nvidia-driver-gpu-pytorch-[\d.]+-ubuntu-[\d.]+/latest/ami-id$")
REGION, ZONE = "us-west-2", "us-west-2a"

_spec = importlib.util.spec_from_file_location("orch_cluster_aws_prepare", AWS_DIR / "prepare.py")
prepare = importlib.util.module_from_spec(_spec)  # cluster/aws/prepare.py, a script beside the cluster files
_spec.loader.exec_module(prepare)


@pytest.fixture(scope="module")
def template() -> dict:
    return yaml.safe_load(AWS.read_text())


@pytest.fixture(scope="module")
def account(tmp_path_factory):
    """A fresh moto account that prepare.py has set up; Ray's calls are recorded (service, operation, params)."""
    moto = pytest.importorskip("moto")
    import botocore.client

    home = tmp_path_factory.mktemp("home")  # Ray writes its SSH key under ~/.ssh
    env = {"HOME": str(home), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": REGION}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    calls: list[tuple[str, str, dict]] = []
    real = botocore.client.BaseClient._make_api_call

    def recording(self, operation, params):
        calls.append((self.meta.service_model.service_name, operation, params))
        return real(self, operation, params)

    botocore.client.BaseClient._make_api_call = recording
    try:
        with moto.mock_aws():
            out = home / "aws-gpu.yaml"
            rc = prepare.main(["--region", REGION, "--zone", ZONE, "--bucket", "my-bucket",
                               "--ssh-cidr", "203.0.113.7/32", "--out", str(out)])
            assert rc == 0
            yield {"config": yaml.safe_load(out.read_text()), "calls": calls, "text": out.read_text()}
    finally:
        botocore.client.BaseClient._make_api_call = real
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_ray_validates_the_cluster_definition(template, account):
    from ray.autoscaler._private.util import prepare_config, validate_config

    for config in (template, account["config"]):
        prepared = prepare_config(config)
        validate_config(prepared)
        assert prepared["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8
        assert prepared["available_node_types"]["head"]["resources"]["CPU"] == 0  # no training on the head


def test_prepare_fills_every_placeholder(account):
    for placeholder in ("ACCOUNT_ID", "ORCH_SUBNET_ID", "ORCH_SECURITY_GROUP_ID"):
        assert placeholder not in account["text"], placeholder
    provider = account["config"]["provider"]
    assert provider["region"] == REGION and provider["availability_zone"] == ZONE
    import boto3

    iam = boto3.client("iam", region_name=REGION)
    for role, policies in prepare.ROLES.items():
        for name in policies:
            doc = iam.get_role_policy(RoleName=role, PolicyName=Path(name).stem)["PolicyDocument"]
            text = doc if isinstance(doc, str) else json.dumps(doc)
            assert not re.search(r"ACCOUNT_ID|REGION|BUCKET", text), text
            assert ("my-bucket" in text) == (name == "node-policy.json"), text
        profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [role]


def _bootstrap(config: dict) -> dict:
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(config)
    validate_config(config)
    return bootstrap_aws(config)


def _admits(ec2, sources: list[str], targets: list[str]) -> bool:
    """Some group of `targets` lets in all traffic from some group of `sources`."""
    for g in ec2.describe_security_groups(GroupIds=sorted(set(targets)))["SecurityGroups"]:
        for perm in g["IpPermissions"]:
            if perm["IpProtocol"] == "-1" and {p["GroupId"] for p in perm.get("UserIdGroupPairs", [])} & set(sources):
                return True
    return False


def test_rays_bootstrap_and_node_provider_bring_up_a_head_and_a_gpu_worker_that_reach_each_other(account):
    import boto3
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND

    config = _bootstrap(account["config"])  # Ray's subnet, key pair, IAM and security group steps
    head, worker = (config["available_node_types"][t]["node_config"] for t in ("head", "gpu_worker"))
    assert head["SecurityGroupIds"] and head["SubnetIds"] and worker["SubnetIds"] == head["SubnetIds"]

    start = len(account["calls"])
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    provider.create_node(head, {TAG_RAY_NODE_KIND: "head"}, 1)
    provider.create_node(worker, {TAG_RAY_NODE_KIND: "worker"}, 1)
    nodes = provider.non_terminated_nodes({})
    assert len(nodes) == 2
    ec2 = boto3.client("ec2", region_name=REGION)
    reservations = ec2.describe_instances(InstanceIds=nodes)["Reservations"]
    inst = {i["InstanceId"]: i for r in reservations for i in r["Instances"]}
    groups = {provider.node_tags(n)[TAG_RAY_NODE_KIND]: [g["GroupId"] for g in inst[n]["SecurityGroups"]]
              + [g["GroupId"] for ni in inst[n]["NetworkInterfaces"] for g in ni["Groups"]] for n in nodes}
    assert _admits(ec2, groups["head"], groups["worker"]) and _admits(ec2, groups["worker"], groups["head"]), groups
    runs = [p for s, op, p in account["calls"][start:] if op == "RunInstances"]
    assert {p["ImageId"] for p in runs} == {head["ImageId"]} and DLAMI_SSM.match(head["ImageId"])  # passed through
    provider.terminate_node(nodes[0])


def test_a_subnet_without_public_ips_needs_use_internal_ips(account):
    """Ray's rule the issue found broken: a private subnet is refused unless provider.use_internal_ips."""
    import boto3
    from ray.autoscaler._private.aws.config import _get_subnets_or_die

    ec2 = boto3.client("ec2", region_name=REGION)
    _get_subnets_or_die.cache_clear()  # Ray caches the subnets it read (lru_cache): read them anew
    subnet = account["config"]["available_node_types"]["head"]["node_config"]["SubnetIds"][0]
    ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": False})
    try:
        with pytest.raises(Exception, match="use_internal_ips: true"):  # click's ClickException
            _bootstrap(account["config"])
        private = json.loads(json.dumps(account["config"]))
        private["provider"]["use_internal_ips"] = True
        _bootstrap(private)
    finally:
        ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": True})
        _get_subnets_or_die.cache_clear()
    assert not account["config"]["provider"].get("use_internal_ips")  # ours maps public IPs: `ray up` from a laptop


def _allowed(policy: dict, action: str) -> bool:
    return any(s["Effect"] == "Allow" and any(fnmatch.fnmatchcase(action, a) for a in
               ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])) for s in policy["Statement"])


def test_the_head_role_may_do_what_rays_autoscaler_does(account):
    """Every EC2 call of Ray's node provider (launch, tag, list, terminate, instance types) is in the
    head's policy, and so is passing the workers' role."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    start = len(account["calls"])
    config = _bootstrap(account["config"])
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    created = provider.create_node(config["available_node_types"]["gpu_worker"]["node_config"], {"k": "v"}, 1)
    provider.non_terminated_nodes({})  # fills the tag cache, as the autoscaler's loop does
    provider.set_node_tags(next(iter(created)), {"k": "w"})
    provider.terminate_nodes(list(created))
    provider.non_terminated_nodes({})
    ops = {op for s, op, _ in account["calls"][start:] if s == "ec2"}
    assert {"RunInstances", "TerminateInstances", "CreateTags", "DescribeInstances"} <= ops, ops
    # the head's monitor also reads instance types (node_provider.py list_ec2_instances, called by
    # fillout_available_node_types_resources: ~4 s against moto's full list, so named here instead)
    ops.add("DescribeInstanceTypes")
    policy = json.loads((AWS_DIR / "iam" / "autoscaler-policy.json").read_text())
    assert [op for op in sorted(ops) if not _allowed(policy, f"ec2:{op}")] == []
    assert _allowed(policy, "iam:PassRole") and _allowed(policy, "ssm:GetParameters")  # the resolve:ssm: image
    passrole = next(s for s in policy["Statement"] if s["Action"] == "iam:PassRole")
    worker_profile = config["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Arn"]
    assert passrole["Resource"].rsplit("/", 1)[1] == worker_profile.rsplit("/", 1)[1] == "orch-node"
    head_profile = config["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]["Arn"]
    assert head_profile.endswith("/orch-head")
    assert prepare.ROLES["orch-head"] == ["node-policy.json", "autoscaler-policy.json"]


def test_prepare_runs_twice_and_deletes_what_it_made(account):
    import boto3

    ec2, iam = boto3.client("ec2", region_name=REGION), boto3.client("iam", region_name=REGION)
    again = prepare.ensure_network(ec2, ZONE, "203.0.113.7/32")
    assert again["subnet"] == account["config"]["available_node_types"]["head"]["node_config"]["SubnetIds"][0]
    for n in ec2.describe_instances()["Reservations"]:  # `ray down` first
        ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in n["Instances"]])
    gone = prepare.delete(ec2, iam)
    assert again["vpc"] in gone and "orch-head" in gone and "orch-node" in gone
    assert not prepare._ours(ec2, "describe_vpcs", "Vpcs")


def test_the_nodes_run_on_the_pytorch_dlami_and_use_its_cuda_torch(template):
    images = {t["node_config"]["ImageId"] for t in template["available_node_types"].values()}
    assert len(images) == 1 and DLAMI_SSM.match(images.pop())  # one image, the PyTorch DLAMI by its SSM name
    commands = template["setup_commands"] + template["head_start_ray_commands"] + template["worker_start_ray_commands"]
    installs = [c for c in commands if "pip install" in c]
    assert installs, "orch is not installed on the nodes"
    for c in installs:
        # into the AMI's environment, its torch pinned (pip may not replace it), orch from the wheel
        # with its training stack
        assert f"{DLAMI_ENV}python -m pip install" in c and "-c ~/torch-constraint.txt" in c and "orch-dist" in c, c
        assert "[train]" in c, c
        assert not re.search(r"\btorch\b[=<>]", c.replace("torch-constraint", "")), c
    assert "'torch==' + torch.__version__" in template["setup_commands"][0]  # the constraint is the AMI's torch
    assert {"/home/ubuntu/orch-dist", "/home/ubuntu/orch-aws"} <= set(template["file_mounts"])
    # `ray up` runs from the repository's root: the mounted folder is there (dist/ is what the build makes)
    assert template["file_mounts"]["/home/ubuntu/orch-aws"] == "./cluster/aws" and (AWS_DIR / "node-env.sh").is_file()
    for c in template["head_start_ray_commands"] + template["worker_start_ray_commands"]:
        assert re.search(r"(^|; )" + re.escape(DLAMI_ENV) + r"ray (start|stop)", c), c
        if "ray start" in c:  # the environment is set before Ray starts, so its processes inherit it
            assert c.index("source ~/orch-aws/node-env.sh") < c.index("ray start"), c


def _node_env(tmp_path: Path, role: str, aws_script: str, **env) -> subprocess.CompletedProcess:
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "aws").write_text("#!/bin/bash\necho \"$@\" > " + str(tmp_path / "aws-args") + "\n" + aws_script)
    (bin_ / "curl").write_text(  # the instance metadata service: a token, then the region
        "#!/bin/bash\ncase \"$*\" in *api/token*) echo tok;; *placement/region*) echo eu-central-1;; esac\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = f"source {AWS_DIR / 'node-env.sh'} {role}; env"
    full = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), **env}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=full, timeout=30)


def test_workers_get_nccl_over_efa_and_the_wandb_key_from_their_regions_secret(tmp_path):
    out = _node_env(tmp_path, "worker", "echo s3cr3t-key")
    env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert "/opt/amazon/ofi-nccl/lib" in env["LD_LIBRARY_PATH"]
    assert env["NCCL_SOCKET_IFNAME"] and env["ORCH_LOCAL_DIR"] == "/opt/dlami/nvme/orch"
    assert env["WANDB_API_KEY"] == "s3cr3t-key"
    args = (tmp_path / "aws-args").read_text().split()
    assert args[:2] == ["secretsmanager", "get-secret-value"] and args[args.index("--region") + 1] == "eu-central-1"
    head = _node_env(tmp_path, "head", "echo k", AWS_DEFAULT_REGION="us-east-2")
    assert "FI_PROVIDER" not in head.stdout and "ORCH_LOCAL_DIR=/tmp/orch" in head.stdout
    args = (tmp_path / "aws-args").read_text().split()
    assert args[args.index("--region") + 1] == "us-east-2"  # AWS_DEFAULT_REGION wins over the metadata


def test_an_unreadable_secret_says_so_in_one_line_and_the_node_starts(tmp_path):
    err = "An error occurred (AccessDeniedException) when calling the GetSecretValue operation: not authorized"
    out = _node_env(tmp_path, "worker", f"echo '{err}' >&2; exit 254")
    assert out.returncode == 0 and "WANDB_API_KEY" not in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "orch/wandb" in lines[0] and "eu-central-1" in lines[0] and "AccessDenied" in lines[0], lines
    assert "create-secret" in lines[0]


def test_no_credentials_in_the_cluster_files():
    for path in [AWS, *AWS_DIR.rglob("*")]:
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
            assert not re.search(r"(AWS_SECRET_ACCESS_KEY|WANDB_API_KEY)=[\"']?[A-Za-z0-9]", text), path
