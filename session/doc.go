// Package session is one VM as kvmscope's readers see it: the memory
// source that is current, metering of every read, pause and resume, the
// guest kernel found once and validated before each use, and the scans of
// the kernel's objects (processes, modules). The API server and the CLI's
// --core path are thin layers over a Session.
//
// A Session is drawn in two halves so that the analysis can one day run in
// a process apart from the tracer (a crash parsing hostile guest memory
// must not take QEMU with it):
//
//   - a Machine is the tracer side: it holds the handles (the VM's memory
//     source, the means to pause it) and parses nothing;
//   - the Session is the analysis side: it holds the parsers (package
//     introspect) and reaches the guest only through its Machine.
//
// Reads flow one way: Session → Machine's source → guest memory. Nothing
// read is kept across scans except the discovered kernel, which is
// checked against guest memory before every scan.
package session
