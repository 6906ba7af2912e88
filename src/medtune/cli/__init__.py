"""medtune.cli"""
