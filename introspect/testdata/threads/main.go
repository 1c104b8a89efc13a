// Command kvm-threads is a multi-threaded process for the test guests: the
// solver tells task_struct.pid from tgid, and the thread walker is
// checked, only where some process has more than one thread.
package main

import (
	"runtime"
	"time"
)

func main() {
	runtime.GOMAXPROCS(4)
	for range 4 {
		go func() {
			// Each goroutine keeps its own OS thread.
			runtime.LockOSThread()
			time.Sleep(1000 * time.Hour)
		}()
	}
	time.Sleep(1000 * time.Hour)
}
