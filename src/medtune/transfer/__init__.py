"""medtune.transfer"""
