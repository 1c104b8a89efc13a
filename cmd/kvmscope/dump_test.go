package main

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

// stallDump asks r's API for a dump, which pauses the guest, reads its
// first bytes and stops reading; the caller closes the connection.
func stallDump(t *testing.T, r *running) net.Conn {
	t.Helper()
	conn, err := net.Dial("unix", r.sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write([]byte("GET /v1/dump HTTP/1.1\r\nHost: kvmscope\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(conn, make([]byte, 4096)); err != nil {
		t.Fatalf("the dump's first bytes: %v", err)
	}
	return conn
}

// tinyPaused says whether the tiny guest's counter stood still for 300 ms.
func tinyPaused(t *testing.T, c *api.Client) bool {
	a := readU64(t, c, testguest.CounterGPA)
	time.Sleep(300 * time.Millisecond)
	return readU64(t, c, testguest.CounterGPA) == a
}

// TestDumpStalledClient: a dump pauses the guest while it streams, and a
// client that stops reading keeps it paused only until one write has
// waited 30 s (dumpStall in api): then the dump is cut short and the
// guest runs again.
func TestDumpStalledClient(t *testing.T) {
	const stall = 30 * time.Second
	r := startRun(t, nil, tinyGuest(t, 1, "")...)
	c := r.client()
	waitReady(t, c)
	conn := stallDump(t, r)
	start := time.Now()
	waitFor(t, 10*time.Second, "the stalled dump to hold the guest paused", func() bool { return tinyPaused(t, c) })
	before := readU64(t, c, testguest.CounterGPA)
	waitFor(t, stall+20*time.Second, "the guest to run again after the stalled dump", func() bool {
		time.Sleep(200 * time.Millisecond)
		return readU64(t, c, testguest.CounterGPA) != before
	})
	if ran := time.Since(start); ran < stall*2/3 {
		t.Errorf("the guest ran again %v into a stalled dump; the pause must hold while the client may still read (%v)", ran, stall)
	}
	// The client gets a short body.
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, conn)
	if err != nil {
		t.Fatalf("reading the rest of the cut dump: %v", err)
	}
	if n >= testguest.MemoryMiB<<20 {
		t.Errorf("the client read %d more bytes, the whole guest; want the dump cut short", n)
	}
	t.Logf("guest ran again after %v; the client then read %d bytes and EOF", time.Since(start).Round(time.Second), n)
}
