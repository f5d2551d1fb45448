from hsd_serve.pb import generate

generate(force=True)
print("generated hsd_serve/pb/hsd_pb2.py, hsd_pb2_grpc.py")
