import boto3, json, sys, time
port = sys.argv[1]; n = int(sys.argv[2])
k = boto3.client('kinesis', endpoint_url=f'http://127.0.0.1:{port}', region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='y')
k.create_stream(StreamName='views', ShardCount=4)
time.sleep(0.5)
import random
random.seed(1)
for base in range(0, n, 500):
    recs = [{'Data': json.dumps({"user_id": i % 50000, "title_id": i % 2000, "event_type": "play", "device": "tv", "country": "BR", "watch_seconds": 1200, "bitrate_kbps": 5800, "event_time": "2026-01-01T10:15:42Z"}).encode(), 'PartitionKey': str(i % 50000)} for i in range(base, min(n, base+500))]
    r = k.put_records(StreamName='views', Records=recs)
    assert r['FailedRecordCount'] == 0
