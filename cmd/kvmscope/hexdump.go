package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
)

// offsetWriter rewrites hex.Dumper's offsets (which start at 0) as guest
// physical addresses.
type offsetWriter struct {
	base uint64
	buf  []byte
}

func (w *offsetWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		line := w.buf[:i]
		if len(line) > 8 {
			if off, err := strconv.ParseUint(string(line[:8]), 16, 64); err == nil {
				fmt.Fprintf(os.Stdout, "%016x%s\n", w.base+off, line[8:])
			}
		}
		w.buf = w.buf[i+1:]
	}
}
