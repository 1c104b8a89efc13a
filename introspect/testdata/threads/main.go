// Command kvm-threads is a multi-threaded process for the test guests: the
// solver tells task_struct.pid from tgid, and the thread walker is
// checked, only where some process has more than one thread. The first
// argument is how many extra threads to start (default 4), so a benchmark
// guest can hold thousands of tasks in little memory.
package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"syscall"
	"time"
)

func main() {
	n := 4
	if len(os.Args) > 1 {
		if v, err := strconv.Atoi(os.Args[1]); err == nil && v >= 0 {
			n = v
		}
	}
	debug.SetMaxThreads(n + 100)
	// Thousands of locked threads make every GC stop-the-world crawl
	// under an emulated CPU; this program hardly allocates.
	debug.SetGCPercent(-1)
	// The threads block in read(2) on a pipe nobody writes to: asleep in
	// the kernel (TASK_INTERRUPTIBLE), no timers in the runtime.
	var p [2]int
	if err := syscall.Pipe(p[:]); err != nil {
		panic(err)
	}
	runtime.GOMAXPROCS(4)
	var started sync.WaitGroup
	for range n {
		started.Add(1)
		go func() {
			// Each goroutine keeps its own OS thread.
			runtime.LockOSThread()
			started.Done()
			var b [1]byte
			syscall.Read(p[0], b[:])
		}()
	}
	started.Wait()
	// On the console, for tests that need all threads to exist.
	fmt.Printf("KVMSCOPE-THREADS-READY %d\n", n)
	time.Sleep(1000 * time.Hour)
}
