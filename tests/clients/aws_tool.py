#!/usr/bin/env python3
"""Creates and reads AWS resources on an emulator (moto server or kinesis-local) for the
tests, with boto3 and AWS's own KPL deaggregator (PyPI `aws-kinesis-agg`): nothing here
shares code with sluice.

  aws_tool.py ENDPOINT create-stream NAME SHARDS
  aws_tool.py ENDPOINT read-stream NAME [--compression gzip|zstd]   -> JSON lines
  aws_tool.py ENDPOINT shards NAME                                     -> JSON lines
  aws_tool.py ENDPOINT update-shard-count NAME SHARDS
  aws_tool.py ENDPOINT create-bucket BUCKET
  aws_tool.py ENDPOINT create-delivery-stream NAME BUCKET
  aws_tool.py ENDPOINT read-bucket BUCKET                               -> the objects' bytes

read-stream prints one JSON line per user record: {"shard", "partition_key",
"aggregated", "in_shard", "data"}, reading every shard (closed parents too) from the
start, decompressing and deaggregating each Kinesis record. in_shard says, for a record
that came out of an aggregate, whether its hash key is in the shard's range, as KCL
requires to keep it.
"""
import base64
import gzip
import hashlib
import json
import sys
import time

import boto3
from aws_kinesis_agg.deaggregator import iter_deaggregate_records

KPL_MAGIC = b"\xf3\x89\x9a\xc2"


def client(endpoint, service):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def all_shards(k, name):
    shards, token = [], None
    while True:
        out = k.list_shards(NextToken=token) if token else k.list_shards(StreamName=name)
        shards += out["Shards"]
        token = out.get("NextToken")
        if not token:
            return shards


def wait_active(k, name):
    for _ in range(200):
        if k.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        time.sleep(0.1)
    sys.exit(f"stream {name} never became active")


def decompress(data, codec):
    if codec == "gzip":
        return gzip.decompress(data)
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def read_stream(k, name, codec):
    for shard in all_shards(k, name):
        sid = shard["ShardId"]
        it = k.get_shard_iterator(StreamName=name, ShardId=sid, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        empty = 0
        while it and empty < 3:
            out = k.get_records(ShardIterator=it, Limit=10000)
            it = out.get("NextShardIterator")
            if not out["Records"]:
                empty += 1
                continue
            empty = 0
            for r in out["Records"]:
                data = decompress(r["Data"], codec)
                aggregated = data[:4] == KPL_MAGIC
                r = dict(r, Data=data)
                for user in iter_deaggregate_records([r], data_format="Boto3"):
                    u = user["kinesis"]
                    payload = u["data"]
                    # KCL drops an inner record whose hash key (its explicit one, else
                    # the MD5 of its partition key) is outside the shard's range.
                    in_shard = None
                    if aggregated:
                        ehk = u.get("explicitHashKey")
                        h = int(ehk) if ehk else int(hashlib.md5(u["partitionKey"].encode()).hexdigest(), 16)
                        rng = shard["HashKeyRange"]
                        in_shard = int(rng["StartingHashKey"]) <= h <= int(rng["EndingHashKey"])
                    # Deaggregated user records come back base64-encoded; records that
                    # were not aggregated pass through as the raw bytes boto3 gave.
                    if aggregated or isinstance(payload, str):
                        payload = base64.b64decode(payload)
                    print(json.dumps({
                        "shard": sid,
                        "partition_key": u.get("partitionKey"),
                        "aggregated": aggregated,
                        "in_shard": in_shard,
                        "data": payload.decode("utf-8"),
                    }))


def main():
    endpoint, cmd, *args = sys.argv[1:]
    if cmd in ("create-stream", "read-stream", "shards", "update-shard-count"):
        k = client(endpoint, "kinesis")
    if cmd == "create-stream":
        name, shards = args
        k.create_stream(StreamName=name, ShardCount=int(shards))
        wait_active(k, name)
    elif cmd == "read-stream":
        name = args[0]
        codec = args[2] if len(args) > 2 and args[1] == "--compression" else None
        read_stream(k, name, codec)
    elif cmd == "shards":
        for s in all_shards(k, args[0]):
            print(json.dumps({
                "id": s["ShardId"],
                "open": "EndingSequenceNumber" not in s.get("SequenceNumberRange", {}),
            }))
    elif cmd == "update-shard-count":
        name, n = args
        k.update_shard_count(StreamName=name, TargetShardCount=int(n), ScalingType="UNIFORM_SCALING")
        wait_active(k, name)
    elif cmd == "create-bucket":
        client(endpoint, "s3").create_bucket(Bucket=args[0])
    elif cmd == "create-delivery-stream":
        name, bucket = args
        client(endpoint, "firehose").create_delivery_stream(
            DeliveryStreamName=name,
            DeliveryStreamType="DirectPut",
            ExtendedS3DestinationConfiguration={
                "RoleARN": "arn:aws:iam::123456789012:role/firehose",
                "BucketARN": f"arn:aws:s3:::{bucket}",
            },
        )
    elif cmd == "read-bucket":
        s3 = client(endpoint, "s3")
        keys, token = [], None
        while True:
            kw = {"Bucket": args[0]}
            if token:
                kw["ContinuationToken"] = token
            out = s3.list_objects_v2(**kw)
            keys += [o["Key"] for o in out.get("Contents", [])]
            token = out.get("NextContinuationToken")
            if not token:
                break
        for key in sorted(keys):
            sys.stdout.buffer.write(s3.get_object(Bucket=args[0], Key=key)["Body"].read())
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
