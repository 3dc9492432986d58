"""gRPC plumbing both processes share: the service's name and the one health probe (sqs_rpc.service).

It lives outside common/, whose modules stay free of network libraries, because the edge and the
cloud never import each other."""
