from rlhf.v1 import policy_pb2 as _policy_pb2
from rlhf.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
