// Package api serves what kvmscope knows about one VM on a local unix
// socket, as versioned HTTP/JSON (/v1/...), and is also the client the CLI
// uses. Only root and the socket's owner may connect: the socket is 0600
// and every connection's peer uid is checked with SO_PEERCRED.
package api
