"""The gRPC front: the grpc.aio server, the service handlers, turning errors into statuses,
the ``--workers`` supervisor and the EMF metrics. The only layer that may import gRPC's server
side; it may import every other broker subpackage."""
