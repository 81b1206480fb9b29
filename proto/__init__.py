"""Caffe-compatible protobuf schema (caffe.proto) and its generated module."""
from . import caffe_pb2
