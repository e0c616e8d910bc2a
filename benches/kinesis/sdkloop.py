# A plain SDK read loop: every shard from TRIM_HORIZON, GetRecords 10,000 at a time, JSON
# parsed per record, shards one after the other.
import boto3, json, sys, time
port = sys.argv[1]; n = int(sys.argv[2])
k = boto3.client('kinesis', endpoint_url=f'http://127.0.0.1:{port}', region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='y')
t0 = time.time(); count = 0
for s in k.list_shards(StreamName='views')['Shards']:
    it = k.get_shard_iterator(StreamName='views', ShardId=s['ShardId'], ShardIteratorType='TRIM_HORIZON')['ShardIterator']
    while it:
        r = k.get_records(ShardIterator=it, Limit=10000)
        for rec in r['Records']:
            json.loads(rec['Data']); count += 1
        if not r['Records']: break
        it = r.get('NextShardIterator')
dt = time.time() - t0
print(f"sdk loop: {count} records in {dt:.2f}s = {count/dt:.0f}/s")
