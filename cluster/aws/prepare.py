"""Prepare an AWS account for cluster/aws-gpu.yaml, and write the copy of it that `ray up` takes.

    python cluster/aws/prepare.py --region us-west-2 --zone us-west-2a --bucket YOUR-BUCKET \
        --ssh-cidr "$(curl -s https://checkip.amazonaws.com)/32"
    # -> ~/.config/orch/aws-gpu.yaml (--out to choose)
    python cluster/aws/prepare.py --region us-west-2 --delete   # after `ray down`: remove it all

Creates, or finds again (everything is tagged orch-cluster=orch-gpu, so a second run changes
nothing):
- a VPC (10.42.0.0/16) with an internet gateway and one public subnet in --zone
  (MapPublicIpOnLaunch: Ray's launcher refuses a subnet without it unless use_internal_ips);
- one security group for head and workers: all traffic from itself (EFA's rule, and Ray's ports
  between nodes), SSH from --ssh-cidr only;
- IAM roles and instance profiles: `orch-node` (cluster/aws/iam/node-policy.json: the bucket, the
  secret orch/wandb) and `orch-head` (that, plus cluster/aws/iam/autoscaler-policy.json: launch,
  tag, terminate instances and pass orch-node).

Needs boto3 (an orch dependency) and credentials of an account administrator in the environment
(AWS_PROFILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY). Errors are one line: what failed, why.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE.parent / "aws-gpu.yaml"
CLUSTER = "orch-gpu"  # cluster_name in aws-gpu.yaml, and the tag value
TAG = "orch-cluster"
CIDR_VPC, CIDR_SUBNET = "10.42.0.0/16", "10.42.0.0/20"
ROLES = {"orch-node": ["node-policy.json"], "orch-head": ["node-policy.json", "autoscaler-policy.json"]}


class PrepareError(Exception):
    """One step failed; the message says which and why."""


def _tags(kind: str, name: str) -> list[dict]:
    return [{"ResourceType": kind, "Tags": [{"Key": TAG, "Value": CLUSTER}, {"Key": "Name", "Value": name}]}]


def _ours(ec2, describe: str, key: str) -> list[dict]:
    return getattr(ec2, describe)(Filters=[{"Name": f"tag:{TAG}", "Values": [CLUSTER]}])[key]


def ensure_network(ec2, zone: str, ssh_cidr: str) -> dict:
    """The VPC, its internet gateway and route, the public subnet, the security group."""
    vpcs = _ours(ec2, "describe_vpcs", "Vpcs")
    if vpcs:
        vpc = vpcs[0]["VpcId"]
    else:
        vpc = ec2.create_vpc(CidrBlock=CIDR_VPC, TagSpecifications=_tags("vpc", CLUSTER))["Vpc"]["VpcId"]
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        igw = ec2.create_internet_gateway(TagSpecifications=_tags("internet-gateway", CLUSTER))
        igw_id = igw["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw_id, VpcId=vpc)
        main = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                                  {"Name": "association.main", "Values": ["true"]}])
        ec2.create_route(RouteTableId=main["RouteTables"][0]["RouteTableId"], DestinationCidrBlock="0.0.0.0/0",
                         GatewayId=igw_id)
    subnets = [s for s in _ours(ec2, "describe_subnets", "Subnets") if s["VpcId"] == vpc]
    if subnets:
        subnet = subnets[0]
        if subnet["AvailabilityZone"] != zone:
            raise PrepareError(f"the orch subnet {subnet['SubnetId']} is in {subnet['AvailabilityZone']}, not "
                               f"{zone}: pass --zone {subnet['AvailabilityZone']}, or --delete first")
        subnet = subnet["SubnetId"]
    else:
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=CIDR_SUBNET, AvailabilityZone=zone,
                                   TagSpecifications=_tags("subnet", CLUSTER))["Subnet"]["SubnetId"]
        ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": True})
    groups = [g for g in _ours(ec2, "describe_security_groups", "SecurityGroups") if g["VpcId"] == vpc]
    if groups:
        sg = groups[0]["GroupId"]
    else:
        sg = ec2.create_security_group(
            GroupName=CLUSTER, VpcId=vpc, TagSpecifications=_tags("security-group", CLUSTER),
            Description="orch: head and GPU workers (all from itself, SSH from one CIDR)")["GroupId"]
        ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": ssh_cidr}]},
        ])
        # EFA also wants all outbound traffic to itself; the default egress rule (all, anywhere) covers it
    return {"vpc": vpc, "subnet": subnet, "security_group": sg}


def _policy(name: str, account: str, region: str, bucket: str) -> str:
    text = (HERE / "iam" / name).read_text()
    return text.replace("ACCOUNT_ID", account).replace("REGION", region).replace("BUCKET", bucket)


def ensure_iam(iam, account: str, region: str, bucket: str) -> None:
    """The roles orch-node and orch-head with their inline policies, each in its instance profile."""
    trust = (HERE / "iam" / "ec2-trust.json").read_text()
    for role, policies in ROLES.items():
        try:
            iam.get_role(RoleName=role)
        except iam.exceptions.NoSuchEntityException:
            iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust, Tags=[{"Key": TAG, "Value": CLUSTER}])
        for p in policies:  # put_role_policy replaces: a second run brings the documents up to date
            iam.put_role_policy(RoleName=role, PolicyName=Path(p).stem,
                                PolicyDocument=_policy(p, account, region, bucket))
        try:
            profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
        except iam.exceptions.NoSuchEntityException:
            profile = iam.create_instance_profile(InstanceProfileName=role)["InstanceProfile"]
        if not any(r["RoleName"] == role for r in profile["Roles"]):
            iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)


def render(template: str, *, account: str, region: str, zone: str, subnet: str, security_group: str) -> str:
    """aws-gpu.yaml with this account's values: the comments stay, only the placeholders change."""
    text = template.replace("ACCOUNT_ID", account).replace("ORCH_SUBNET_ID", subnet)
    text = text.replace("ORCH_SECURITY_GROUP_ID", security_group)
    text = re.sub(r"^(  region:) \S+", rf"\1 {region}", text, count=1, flags=re.M)
    return re.sub(r"^(  availability_zone:) \S+", rf"\1 {zone}", text, count=1, flags=re.M)


def delete(ec2, iam) -> list[str]:
    """Everything ensure_network and ensure_iam made (run `ray down` first: no instance may remain)."""
    gone = []
    for vpc in _ours(ec2, "describe_vpcs", "Vpcs"):
        v = vpc["VpcId"]
        for g in ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [v]}])["SecurityGroups"]:
            if g["GroupName"] != "default":
                ec2.delete_security_group(GroupId=g["GroupId"])
                gone.append(g["GroupId"])
        for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [v]}])["Subnets"]:
            ec2.delete_subnet(SubnetId=s["SubnetId"])
            gone.append(s["SubnetId"])
        attached = [{"Name": "attachment.vpc-id", "Values": [v]}]
        for g in ec2.describe_internet_gateways(Filters=attached)["InternetGateways"]:
            ec2.detach_internet_gateway(InternetGatewayId=g["InternetGatewayId"], VpcId=v)
            ec2.delete_internet_gateway(InternetGatewayId=g["InternetGatewayId"])
            gone.append(g["InternetGatewayId"])
        ec2.delete_vpc(VpcId=v)
        gone.append(v)
    for role, policies in ROLES.items():
        try:
            iam.remove_role_from_instance_profile(InstanceProfileName=role, RoleName=role)
        except iam.exceptions.NoSuchEntityException:
            pass
        try:
            iam.delete_instance_profile(InstanceProfileName=role)
        except iam.exceptions.NoSuchEntityException:
            pass
        try:
            for p in policies:
                iam.delete_role_policy(RoleName=role, PolicyName=Path(p).stem)
            iam.delete_role(RoleName=role)
            gone.append(role)
        except iam.exceptions.NoSuchEntityException:
            pass
    return gone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", required=True, help="e.g. us-west-2 (one with the GPU instances you will use)")
    ap.add_argument("--zone", help="availability zone of the subnet, e.g. us-west-2a (p4d/p5 are not in every zone)")
    ap.add_argument("--bucket", help="the S3 bucket of storage.root (the nodes may read and write it)")
    ap.add_argument("--ssh-cidr", help="who may SSH to the nodes: your address as a /32")
    ap.add_argument("--out", type=Path, default=Path.home() / ".config" / "orch" / "aws-gpu.yaml")
    ap.add_argument("--delete", action="store_true", help="remove what this made (after `ray down`)")
    args = ap.parse_args(argv)
    import boto3
    import botocore.exceptions

    try:
        ec2, iam = boto3.client("ec2", region_name=args.region), boto3.client("iam", region_name=args.region)
        if args.delete:
            print("deleted:", " ".join(delete(ec2, iam)) or "nothing")
            return 0
        missing = [f"--{k.replace('_', '-')}" for k in ("zone", "bucket", "ssh_cidr") if not getattr(args, k)]
        if missing:
            raise PrepareError(f"missing {' '.join(missing)}")
        account = boto3.client("sts", region_name=args.region).get_caller_identity()["Account"]
        net = ensure_network(ec2, args.zone, args.ssh_cidr)
        ensure_iam(iam, account, args.region, args.bucket)
        text = render(TEMPLATE.read_text(), account=account, region=args.region, zone=args.zone,
                      subnet=net["subnet"], security_group=net["security_group"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    except (PrepareError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({**net, "account": account, "cluster_yaml": str(args.out)}))
    print(f"next: python -m build --wheel && ray up {args.out}  (from the repository's root)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
