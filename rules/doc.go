// Package rules is kvmscope's rule base: a YAML file of rules judged
// against what a scan of the guest saw (docs/rules.md).
//
// Parse or Load reads a file into a Set, every error one line
// "FILE:LINE: message". Set.Evaluate judges a Subject (the processes,
// the previous scan's processes, the modules, the dispatch deviations and
// the cross-views' hidden objects) and returns Findings, each with a Key
// stable across scans; a Tracker follows them from scan to scan (first
// and last seen, how often) and says which are new.
package rules
